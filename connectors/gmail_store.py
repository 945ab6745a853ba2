"""Connected mailboxes in PostgreSQL: tokens (AES-GCM), poll cursors, leases and threads."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from connectors.gmail import Tokens
from flexoraa import audit
from flexoraa.crypto import SecretBox

logger = logging.getLogger(__name__)

PROVIDER = "gmail"


@dataclass(frozen=True)
class MailboxRow:
    integration_id: str
    tenant_id: str
    email: str
    history_id: int | None
    tokens: Tokens


@dataclass(frozen=True)
class Thread:
    integration_id: str
    thread_id: str
    last_message_id: str | None
    references: str | None
    subject: str | None


def _associated(integration_id: str) -> str:
    # Bound to the row: a ciphertext copied to another integration does not decrypt.
    return f"{integration_id}:gmail_tokens"


class GmailStore:
    def __init__(self, pool: Callable[[], Awaitable[asyncpg.Pool]], box: SecretBox) -> None:
        self._pool = pool
        self._box = box

    async def connect(self, tenant_id: str, email: str, tokens: Tokens, history_id: int) -> str:
        """Stores (or reconnects) a mailbox and makes it due for polling now."""
        async with (await self._pool()).acquire() as conn, conn.transaction():
            integration_id = await conn.fetchval(
                "SELECT integration_id::text FROM integration_credentials"
                " WHERE tenant_id = $1 AND provider = $2 AND account = $3",
                tenant_id, PROVIDER, email,
            )  # fmt: skip
            if integration_id is None:
                integration_id = str(uuid.uuid4())
                await conn.execute(
                    "INSERT INTO integration_credentials (integration_id, tenant_id, provider,"
                    " account, encrypted_secret) VALUES ($1, $2, $3, $4, $5)",
                    integration_id, tenant_id, PROVIDER, email,
                    self._box.encrypt(tokens.to_json(), _associated(integration_id)),
                )  # fmt: skip
            else:
                await conn.execute(
                    "UPDATE integration_credentials SET encrypted_secret = $2,"
                    " status = 'connected', updated_at = now() WHERE integration_id = $1",
                    integration_id,
                    self._box.encrypt(tokens.to_json(), _associated(integration_id)),
                )
            # A reconnect keeps its cursor: mail that arrived while disconnected is read.
            await conn.execute(
                "INSERT INTO gmail_poll_state (integration_id, tenant_id, email, history_id,"
                " next_poll_at) VALUES ($1, $2, $3, $4, now())"
                " ON CONFLICT (integration_id) DO UPDATE SET next_poll_at = now(),"
                " last_error = NULL, history_id = coalesce(gmail_poll_state.history_id,"
                " EXCLUDED.history_id)",
                integration_id, tenant_id, email, history_id,
            )  # fmt: skip
            await audit.record(conn, tenant_id=tenant_id, actor="google",
                               action="integration.connected", target=str(integration_id),
                               details={"provider": PROVIDER, "account": email})  # fmt: skip
        return str(integration_id)

    async def claim_due(self, owner: str, lease_s: int, limit: int) -> list[MailboxRow]:
        """Leases due mailboxes to `owner`: no mailbox is polled by two pollers at once."""
        rows = await (await self._pool()).fetch(
            """UPDATE gmail_poll_state p
               SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2),
                   last_polled_at = now()
               FROM integration_credentials c
               WHERE p.integration_id IN (
                   SELECT s.integration_id FROM gmail_poll_state s
                   JOIN integration_credentials i USING (integration_id)
                   WHERE i.status = 'connected' AND s.next_poll_at <= now()
                     AND (s.lease_expires_at IS NULL OR s.lease_expires_at < now())
                   ORDER BY s.next_poll_at LIMIT $3
                   FOR UPDATE OF s SKIP LOCKED)
                 AND c.integration_id = p.integration_id
               RETURNING p.integration_id::text, p.tenant_id::text, p.email, p.history_id,
                         c.encrypted_secret""",
            owner, float(lease_s), limit,
        )  # fmt: skip
        mailboxes = []
        for r in rows:
            try:
                tokens = Tokens.from_json(
                    self._box.decrypt(r["encrypted_secret"], _associated(r["integration_id"]))
                )
            except (ValueError, KeyError, TypeError) as exc:
                # Another key, a row restored from elsewhere: raised here, it stopped the
                # poller at every start, and every tenant's intake with it. Kept failing,
                # visible in the integration's status, until it is connected again.
                logger.error("tokens of mailbox %s unreadable: %r", r["email"], exc)
                await (await self._pool()).execute(
                    "UPDATE gmail_poll_state SET last_error = $3, last_error_at = now(),"
                    " next_poll_at = now() + make_interval(secs => $4), lease_owner = NULL,"
                    " lease_expires_at = NULL WHERE integration_id = $1 AND lease_owner = $2",
                    uuid.UUID(r["integration_id"]), owner,
                    f"stored tokens unreadable ({exc}): connect the mailbox again", float(lease_s),
                )  # fmt: skip
                continue
            mailboxes.append(
                MailboxRow(r["integration_id"], r["tenant_id"], r["email"], r["history_id"], tokens)
            )
        return mailboxes

    async def renew(self, mailbox: MailboxRow, owner: str, lease_s: int) -> bool:
        """Extends `owner`'s lease on the mailbox; False if it was lost."""
        renewed = await (await self._pool()).fetchval(
            "UPDATE gmail_poll_state SET lease_expires_at = now() + make_interval(secs => $3)"
            " WHERE integration_id = $1 AND lease_owner = $2 RETURNING 1",
            uuid.UUID(mailbox.integration_id), owner, float(lease_s),
        )  # fmt: skip
        return renewed is not None

    async def advance(
        self, mailbox: MailboxRow, owner: str, history_id: int, interval_s: float, tokens: Tokens
    ) -> bool:
        """Moves the cursor after Kafka acknowledged the events, releases the lease. False if
        the lease was lost meanwhile (another poller owns the mailbox now)."""
        async with (await self._pool()).acquire() as conn, conn.transaction():
            moved = await conn.fetchval(
                "UPDATE gmail_poll_state SET history_id = $3, last_success_at = now(),"
                " last_error = NULL, next_poll_at = now() + make_interval(secs => $4),"
                " lease_owner = NULL, lease_expires_at = NULL"
                " WHERE integration_id = $1 AND lease_owner = $2 RETURNING 1",
                mailbox.integration_id, owner, history_id, interval_s,
            )  # fmt: skip
            if moved and tokens != mailbox.tokens:
                await conn.execute(
                    "UPDATE integration_credentials SET encrypted_secret = $2, updated_at = now()"
                    " WHERE integration_id = $1",
                    mailbox.integration_id,
                    self._box.encrypt(tokens.to_json(), _associated(mailbox.integration_id)),
                )
        return bool(moved)

    async def failed(self, mailbox: MailboxRow, owner: str, error: str, retry_s: float) -> None:
        await (await self._pool()).execute(
            "UPDATE gmail_poll_state SET last_error = $3, last_error_at = now(),"
            " next_poll_at = now() + make_interval(secs => $4), lease_owner = NULL,"
            " lease_expires_at = NULL WHERE integration_id = $1 AND lease_owner = $2",
            mailbox.integration_id, owner, error[:1000], retry_s,
        )  # fmt: skip

    async def disconnect(self, mailbox: MailboxRow, owner: str, error: str) -> None:
        async with (await self._pool()).acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE integration_credentials SET status = 'disconnected', updated_at = now()"
                " WHERE integration_id = $1",
                mailbox.integration_id,
            )
            await conn.execute(
                "UPDATE gmail_poll_state SET last_error = $2, last_error_at = now(),"
                " lease_owner = NULL, lease_expires_at = NULL WHERE integration_id = $1",
                mailbox.integration_id, error[:1000],
            )  # fmt: skip
            await audit.record(conn, tenant_id=mailbox.tenant_id, actor="google",
                               action="integration.disconnected", target=mailbox.integration_id,
                               details={"provider": PROVIDER, "account": mailbox.email,
                                        "reason": error[:300]})  # fmt: skip

    async def remember_threads(self, rows: list[tuple[str, str, str, str, str | None,
                                                      str | None, str]]) -> None:  # fmt: skip
        """(lead_id, tenant_id, integration_id, thread_id, message_id, references, subject)."""
        if not rows:
            return
        await (await self._pool()).executemany(
            "INSERT INTO email_threads (lead_id, tenant_id, integration_id, thread_id,"
            " last_message_id, references_header, subject) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (lead_id) DO UPDATE SET integration_id = EXCLUDED.integration_id,"
            " thread_id = EXCLUDED.thread_id, last_message_id = EXCLUDED.last_message_id,"
            " references_header = EXCLUDED.references_header, subject = EXCLUDED.subject,"
            " updated_at = now()",
            rows,
        )

    async def known_leads(self, tenant_id: str, lead_ids: list[str]) -> set[str]:
        """Which of `lead_ids` are leads of the tenant: the sink has their first message, or a
        poll read their mail (its thread is remembered before the sink may have caught up)."""
        if not lead_ids:
            return set()
        rows = await (await self._pool()).fetch(
            "SELECT lead_id::text FROM leads WHERE tenant_id = $1 AND lead_id = ANY($2::uuid[])"
            " UNION SELECT lead_id::text FROM email_threads"
            " WHERE tenant_id = $1 AND lead_id = ANY($2::uuid[])",
            uuid.UUID(tenant_id), [uuid.UUID(lead_id) for lead_id in lead_ids],
        )  # fmt: skip
        return {row["lead_id"] for row in rows}

    async def thread_of(self, lead_id: str) -> Thread | None:
        row = await (await self._pool()).fetchrow(
            "SELECT integration_id::text, thread_id, last_message_id, references_header, subject"
            " FROM email_threads WHERE lead_id = $1",
            uuid.UUID(lead_id),
        )
        if row is None:
            return None
        return Thread(row["integration_id"], row["thread_id"], row["last_message_id"],
                      row["references_header"], row["subject"])  # fmt: skip

    async def mailbox(self, tenant_id: str, integration_id: str | None = None) -> MailboxRow | None:
        """A connected mailbox of the tenant (the given one, else the first connected)."""
        row = await (await self._pool()).fetchrow(
            "SELECT c.integration_id::text, c.tenant_id::text, c.account, c.encrypted_secret,"
            " p.history_id FROM integration_credentials c"
            " LEFT JOIN gmail_poll_state p USING (integration_id)"
            " WHERE c.tenant_id = $1 AND c.provider = 'gmail' AND c.status = 'connected'"
            " AND ($2::uuid IS NULL OR c.integration_id = $2::uuid)"
            " ORDER BY c.created_at LIMIT 1",
            tenant_id, integration_id,
        )  # fmt: skip
        if row is None:
            return None
        return MailboxRow(
            row["integration_id"], row["tenant_id"], row["account"], row["history_id"],
            Tokens.from_json(
                self._box.decrypt(row["encrypted_secret"], _associated(row["integration_id"]))
            ),
        )  # fmt: skip

    async def save_tokens(self, mailbox: MailboxRow, tokens: Tokens) -> None:
        if tokens != mailbox.tokens:
            await (await self._pool()).execute(
                "UPDATE integration_credentials SET encrypted_secret = $2, updated_at = now()"
                " WHERE integration_id = $1",
                mailbox.integration_id,
                self._box.encrypt(tokens.to_json(), _associated(mailbox.integration_id)),
            )

    async def status(self, tenant_id: str) -> list[dict[str, object]]:
        rows = await (await self._pool()).fetch(
            "SELECT c.provider, c.account, c.status, p.last_success_at, p.last_error,"
            " p.last_error_at, p.last_polled_at FROM integration_credentials c"
            " LEFT JOIN gmail_poll_state p USING (integration_id)"
            " WHERE c.tenant_id = $1 ORDER BY c.provider, c.account",
            tenant_id,
        )
        return [dict(r) for r in rows]
