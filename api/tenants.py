"""Tenants and their API keys. Keys are shown once, stored as SHA-256 hashes."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from flexoraa import audit
from flexoraa.credits import grant_trial

KEY_PREFIX = "fxk_"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    key_id: str
    role: str


@dataclass(frozen=True, slots=True)
class NewTenant:
    tenant_id: str
    api_key: str


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


async def create_tenant(
    conn: asyncpg.Connection,
    name: str,
    admin_emails: list[str] | None = None,
    *,
    trial_tokens: int = 0,
) -> NewTenant:
    tenant_id = str(uuid.uuid4())
    async with conn.transaction():
        await conn.execute("INSERT INTO tenants (tenant_id, name) VALUES ($1, $2)", tenant_id, name)
        for email in admin_emails or []:
            await conn.execute(
                "INSERT INTO tenant_admins (tenant_id, email) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                tenant_id,
                email.strip().lower(),
            )
        await audit.record(conn, tenant_id=tenant_id, actor="cli", action="tenant.created",
                           target=tenant_id, details={"name": name})  # fmt: skip
        _, api_key = await create_api_key(conn, tenant_id, actor="cli")
        await grant_trial(conn, tenant_id, trial_tokens)
    return NewTenant(tenant_id=tenant_id, api_key=api_key)


async def create_api_key(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    tenant_id: str,
    role: str = "admin",
    *,
    actor: str,
) -> tuple[str, str]:
    """A new key of the tenant: (key id, the key itself, shown once)."""
    api_key = generate_api_key()
    key_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO api_keys (key_id, tenant_id, key_hash, key_prefix, role)"
        " VALUES ($1, $2, $3, $4, $5)",
        key_id,
        tenant_id,
        hash_api_key(api_key),
        api_key[: len(KEY_PREFIX) + 6],
        role,
    )
    await audit.record(conn, tenant_id=tenant_id, actor=actor, action="api_key.created",
                       target=str(key_id), details={"role": role})  # fmt: skip
    return str(key_id), api_key


async def find_principal(conn: asyncpg.Connection | asyncpg.Pool, api_key: str) -> Principal | None:
    row = await conn.fetchrow(
        "SELECT key_id, tenant_id, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        hash_api_key(api_key),
    )
    if row is None:
        return None
    return Principal(tenant_id=str(row["tenant_id"]), key_id=str(row["key_id"]), role=row["role"])


class PrincipalCache:
    """Verified keys for a short TTL, so a request costs no database round trip.

    Revoking a key therefore takes effect within the TTL on every API replica.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Principal]] = {}
        # Keys revoked through this process: a request that read the key before the revoke
        # must not cache it again after. Small (one id per revocation, for the process's life).
        self._revoked: set[str] = set()
        # Verifications under way, by key hash.
        self._flights: dict[bytes, asyncio.Future[Principal]] = {}

    def get(self, api_key: str) -> Principal | None:
        entry = self._entries.get(hash_api_key(api_key))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def verified_before(self, api_key: str) -> bool:
        """Whether this key was verified here and not revoked since (its entry may have
        expired): a key a client has used before is no guess."""
        entry = self._entries.get(hash_api_key(api_key))
        return entry is not None and entry[1].key_id not in self._revoked

    async def once(
        self, api_key: str, source: str, verify: Callable[[], Awaitable[Principal]]
    ) -> Principal:
        """`verify()`'s answer for the key, one verification at a time per key and client
        address: requests sent at once with one key share it (each a lookup of its own, a
        client's 50 parallel requests after a restart counted as 50 unknown keys against its
        address's limit). Per address: one address's refusal (429) is not another's."""
        digest = hash_api_key(api_key) + b"|" + source.encode()
        flight = self._flights.get(digest)
        if flight is None:
            flight = asyncio.ensure_future(verify())
            self._flights[digest] = flight
            flight.add_done_callback(lambda done: self._landed(digest, done))
        # Shielded: a caller that goes away does not cancel the others' answer.
        return await asyncio.shield(flight)

    def _landed(self, digest: bytes, flight: asyncio.Future[Principal]) -> None:
        self._flights.pop(digest, None)
        if not flight.cancelled():
            flight.exception()  # retrieved, so none is logged as lost when every caller left

    def forget(self, api_key: str) -> None:
        """Drops the key's entry: the database no longer knows it."""
        self._entries.pop(hash_api_key(api_key), None)

    def forget_key(self, key_id: str) -> None:
        """A revoked key stops working on this replica at once (others: within the TTL)."""
        self._revoked.add(key_id)
        self._entries = {h: e for h, e in self._entries.items() if e[1].key_id != key_id}

    def put(self, api_key: str, principal: Principal) -> None:
        if self._ttl_s <= 0 or principal.key_id in self._revoked:
            return
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[hash_api_key(api_key)] = (time.monotonic() + self._ttl_s, principal)
