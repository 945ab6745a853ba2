"""The channel directory: registered Meta channels, their owners and decrypted secrets.

Webhooks need "which tenant owns phone_number_id X and what is its app secret" on every
request, and senders need access tokens, so lookups are served from memory and reloaded from
PostgreSQL on a short interval or on a miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from flexoraa.crypto import SecretBox

CHANNEL_KINDS = ("whatsapp", "instagram", "facebook")


@dataclass(frozen=True, slots=True)
class Channel:
    channel_id: str
    tenant_id: str
    kind: str
    external_id: str
    waba_id: str | None
    display_phone_number: str | None
    app_secret: str
    access_token: str


def verify_token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def register_channel(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool,
    box: SecretBox,
    *,
    tenant_id: str,
    kind: str,
    external_id: str,
    app_secret: str,
    verify_token: str,
    access_token: str,
    waba_id: str | None = None,
    display_phone_number: str | None = None,
) -> tuple[str, bool]:
    """Register (or, for the same tenant, update) a channel; returns (channel id, created).

    Raises `ChannelTaken` when another tenant owns the number or page.
    """
    channel_id = str(uuid.uuid4())
    row = await conn.fetchrow(
        "SELECT channel_id, tenant_id FROM channels WHERE kind = $1 AND external_id = $2",
        kind,
        external_id,
    )
    if row is not None:
        if str(row["tenant_id"]) != tenant_id:
            raise ChannelTaken(f"{kind} {external_id} is registered to another tenant")
        channel_id = str(row["channel_id"])
    await conn.execute(
        """INSERT INTO channels (channel_id, tenant_id, kind, external_id, waba_id,
                                 display_phone_number, encrypted_app_secret,
                                 encrypted_access_token, verify_token_hash)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT (channel_id) DO UPDATE SET
               waba_id = EXCLUDED.waba_id,
               display_phone_number = EXCLUDED.display_phone_number,
               encrypted_app_secret = EXCLUDED.encrypted_app_secret,
               encrypted_access_token = EXCLUDED.encrypted_access_token,
               verify_token_hash = EXCLUDED.verify_token_hash""",
        channel_id,
        tenant_id,
        kind,
        external_id,
        waba_id,
        display_phone_number,
        box.encrypt(app_secret, f"{channel_id}:app_secret"),
        box.encrypt(access_token, f"{channel_id}:access_token"),
        verify_token_hash(verify_token),
    )
    return channel_id, row is None


class ChannelTaken(ValueError):
    """The number or page belongs to another tenant."""


class ChannelDirectory:
    def __init__(
        self,
        pool_factory: Callable[[], Awaitable[asyncpg.Pool]],
        box: SecretBox,
        refresh_s: float = 30.0,
        miss_refresh_s: float = 2.0,
    ) -> None:
        self._pool_factory = pool_factory
        self._box = box
        self._refresh_s = refresh_s
        self._miss_refresh_s = miss_refresh_s
        self._by_external: dict[tuple[str, str], Channel] = {}
        self._misses: dict[tuple[str, str], float] = {}
        self._tenant_misses: dict[tuple[str, str], float] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    _COLUMNS = """channel_id, tenant_id, kind, external_id, waba_id, display_phone_number,
                  encrypted_app_secret, encrypted_access_token"""

    def _decode(self, row: asyncpg.Record) -> Channel:
        channel_id = str(row["channel_id"])
        return Channel(
            channel_id=channel_id,
            tenant_id=str(row["tenant_id"]),
            kind=row["kind"],
            external_id=row["external_id"],
            waba_id=row["waba_id"],
            display_phone_number=row["display_phone_number"],
            app_secret=self._box.decrypt(row["encrypted_app_secret"], f"{channel_id}:app_secret"),
            access_token=self._box.decrypt(
                row["encrypted_access_token"], f"{channel_id}:access_token"
            ),
        )

    async def _reload(self) -> None:
        pool = await self._pool_factory()
        # Oldest first: a lead without a number of its own is answered from the tenant's first
        # channel, the same one on every worker and after every reload.
        rows = await pool.fetch(
            f"SELECT {self._COLUMNS} FROM channels ORDER BY created_at, channel_id"
        )
        self._by_external = {(row["kind"], row["external_id"]): self._decode(row) for row in rows}
        self._misses.clear()
        self._tenant_misses.clear()
        self._loaded_at = time.monotonic()

    async def _fresh(self, max_age_s: float) -> None:
        if time.monotonic() - self._loaded_at <= max_age_s:
            return
        async with self._lock:
            if time.monotonic() - self._loaded_at > max_age_s:
                await self._reload()

    def invalidate(self) -> None:
        """Forget everything, e.g. after this process registered a channel."""
        self._loaded_at = float("-inf")

    async def app_secrets(self) -> set[str]:
        await self._fresh(self._refresh_s)
        return {channel.app_secret for channel in self._by_external.values()}

    async def app_secrets_after_miss(self) -> set[str]:
        """Reload soon after a failed verification: a channel may have just been registered."""
        await self._fresh(self._miss_refresh_s)
        return {channel.app_secret for channel in self._by_external.values()}

    async def find(self, kind: str, external_id: str) -> Channel | None:
        """A channel by its Meta id; a miss asks PostgreSQL for that row (one indexed read),
        and is remembered briefly so unknown numbers cannot turn into a query per request."""
        await self._fresh(self._refresh_s)
        key = (kind, external_id)
        channel = self._by_external.get(key)
        if channel is not None:
            return channel
        missed_at = self._misses.get(key)
        if missed_at is not None and time.monotonic() - missed_at < self._miss_refresh_s:
            return None
        pool = await self._pool_factory()
        row = await pool.fetchrow(
            f"SELECT {self._COLUMNS} FROM channels WHERE kind = $1 AND external_id = $2",
            kind,
            external_id,
        )
        if row is None:
            self._misses[key] = time.monotonic()
            return None
        channel = self._decode(row)
        self._by_external[key] = channel
        return channel

    async def for_tenant(self, tenant_id: str, kind: str) -> list[Channel]:
        await self._fresh(self._refresh_s)
        known = [
            c for c in self._by_external.values() if c.tenant_id == tenant_id and c.kind == kind
        ]
        if known:
            return known
        # A tenant without a channel of the kind (a webchat-only tenant's lead answered by
        # the AI) would otherwise cost a query per message sent.
        missed_at = self._tenant_misses.get((tenant_id, kind))
        if missed_at is not None and time.monotonic() - missed_at < self._miss_refresh_s:
            return []
        pool = await self._pool_factory()
        rows = await pool.fetch(
            f"SELECT {self._COLUMNS} FROM channels WHERE tenant_id = $1 AND kind = $2"
            " ORDER BY created_at",
            tenant_id,
            kind,
        )
        channels = [self._decode(row) for row in rows]
        if not channels:
            self._tenant_misses[(tenant_id, kind)] = time.monotonic()
        for channel in channels:
            self._by_external[(channel.kind, channel.external_id)] = channel
        return channels
