"""The notifications agent: every Notification becomes an in-app row and e-mails.

Recipients: "admins" are the tenant's `tenant_admins`; "sdr" is one SDR of the roster. The
in-app rows are written first, a batch per transaction, idempotently (a row's id is the event
id), so a redelivered notification is stored once; e-mail is best effort after it (a failure is
logged and counted, the stream goes on — a broken mail server must not stop alerts from being
recorded).
"""

from __future__ import annotations

import json
import logging
import smtplib
import uuid
from collections.abc import Awaitable, Callable
from typing import NamedTuple, cast

import asyncpg
from faust import Stream
from faust.types import AppT, EventT, StreamT, TopicT

from connectors.gmail import GmailApiError, GmailNotConfigured, MailboxRevoked
from connectors.gmail_send import EmailSender, NoMailbox
from connectors.mailer import Mailer
from flexoraa.db import while_unreachable
from schemas.notifications import Notification
from streams.dead_letters import dead_letter_event, decode_or_dead_letter
from streams.metrics import NOTIFICATIONS
from streams.poison import PoisonRecords

logger = logging.getLogger(__name__)


class Recorded(NamedTuple):
    stored: list[tuple[Notification, list[str]]]
    unknown_tenant: list[Notification]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class NotificationStore:
    def __init__(self, pool_factory: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._pool_factory = pool_factory

    async def record(self, batch: list[Notification]) -> Recorded:
        """Store the in-app rows of a batch in one transaction; the notifications not stored
        before, each with its recipients' addresses, and those of tenants that do not exist
        (the foreign key would fail the whole batch, and the retried batch again, forever).

        One round trip per query for the whole batch: a leak storm is hundreds of alerts a
        second, and a row at a time (three queries each) made this agent the worker's bottleneck.
        """
        if not batch:
            return Recorded([], [])
        unique = list({n.event_id: n for n in batch}.values())
        pool = await self._pool_factory()
        async with pool.acquire() as conn, conn.transaction():
            known = {
                str(row["tenant_id"])
                for row in await conn.fetch(
                    "SELECT tenant_id FROM tenants WHERE tenant_id = ANY($1::uuid[])",
                    # Only ids that are UUIDs: any other string fails the whole query, and the
                    # agent crashed on it at every restart (a latency event's tenant id is
                    # whatever its producer wrote, and an SLA alert carries it here).
                    sorted({n.tenant_id for n in unique if _is_uuid(n.tenant_id)}),
                )
            }
            unknown = [n for n in unique if n.tenant_id not in known]
            unique = [n for n in unique if n.tenant_id in known]
            sdr_ids = sorted(
                {
                    n.sdr_id
                    for n in unique
                    if n.audience == "sdr" and n.sdr_id and _is_uuid(n.sdr_id)
                }
            )
            admin_tenants = sorted({n.tenant_id for n in unique if n.audience == "admins"})
            sdr_emails = {
                (str(row["sdr_id"]), str(row["tenant_id"])): row["email"]
                for row in await conn.fetch(
                    "SELECT sdr_id, tenant_id, email FROM sdrs WHERE sdr_id = ANY($1::uuid[])",
                    sdr_ids,
                )
            }
            admin_emails: dict[str, list[str]] = {}
            for row in await conn.fetch(
                "SELECT tenant_id, email FROM tenant_admins WHERE tenant_id = ANY($1::uuid[])"
                " ORDER BY tenant_id, email",
                admin_tenants,
            ):
                admin_emails.setdefault(str(row["tenant_id"]), []).append(row["email"])
            inserted = {
                str(row["notification_id"])
                for row in await conn.fetch(
                    """INSERT INTO notifications (notification_id, tenant_id, recipient, kind,
                                                  title, body, data, created_at)
                       SELECT id, tenant, recipient, kind, title, body, data::jsonb, at
                       FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                   $6::text[], $7::text[], $8::timestamptz[])
                            AS r(id, tenant, recipient, kind, title, body, data, at)
                       ON CONFLICT (notification_id) DO NOTHING RETURNING notification_id""",
                    [n.event_id for n in unique],
                    [n.tenant_id for n in unique],
                    [f"sdr:{n.sdr_id}" if n.audience == "sdr" else "admins" for n in unique],
                    [n.category for n in unique],
                    [n.title for n in unique],
                    [n.body for n in unique],
                    [json.dumps(n.data) for n in unique],
                    [n.occurred_at for n in unique],
                )
            }
        stored = []
        for notification in unique:
            if notification.event_id not in inserted:
                continue  # delivered before
            if notification.audience == "sdr":
                email = sdr_emails.get((str(notification.sdr_id), notification.tenant_id))
                recipients = [email] if email else []
            else:
                recipients = admin_emails.get(notification.tenant_id, [])
            stored.append((notification, recipients))
        return Recorded(stored, unknown)


def register(
    app: AppT,
    *,
    notifications: TopicT,
    dead_letters: TopicT,
    store: NotificationStore,
    mailer: Mailer,
    gmail: EmailSender,
    batch_size: int,
    batch_window_s: float,
    poison: PoisonRecords,
) -> None:
    async def email(notification: Notification, recipients: list[str]) -> str:
        """SMTP when configured, else the tenant's own connected Gmail; which one it was."""
        if mailer.configured:
            await mailer.send(recipients, notification.title, notification.body)
            return "email"
        await gmail.send(notification.tenant_id, to=", ".join(recipients),
                         subject=notification.title, body=notification.body)  # fmt: skip
        return "gmail"

    async def record(batch: list[Notification], event_of: dict[str, EventT[bytes]]) -> Recorded:
        """The batch stored; if PostgreSQL refuses it for one notification's sake (a NUL in a
        text, an id it cannot read), stored one by one and the refused ones dead-lettered:
        retried whole, the batch failed again at every restart (streams.poison)."""
        try:
            return await while_unreachable(store.record, batch)
        except Exception as exc:
            if not poison.should_dead_letter(exc):
                raise
        recorded = Recorded([], [])
        for notification in batch:
            try:
                one = await while_unreachable(store.record, [notification])
            except Exception as exc:
                # The breaker judged the batch above: stopping halfway left the ones stored
                # before unmailed for good (stored, they count as delivered on a restart).
                if not poison.should_dead_letter(exc, breaker=False):
                    raise
                await poison.dead_letter(event_of[notification.event_id].message, exc)
                continue
            recorded.stored.extend(one.stored)
            recorded.unknown_tenant.extend(one.unknown_tenant)
        return recorded

    @app.agent(notifications, name="notifications")
    async def deliver(stream: StreamT[bytes]) -> None:
        # take_events (not take): a dead letter needs the record's partition and offset.
        batches = cast(Stream[bytes], stream).take_events(batch_size, within=batch_window_s)
        async for events in batches:
            batch = []
            event_of: dict[str, EventT[bytes]] = {}
            for event in events:
                notification = await decode_or_dead_letter(
                    Notification.model_validate_json, event.message, dead_letters
                )
                if notification is None:
                    continue
                batch.append(notification)
                event_of[notification.event_id] = event
            recorded = await record(batch, event_of)
            for notification in recorded.unknown_tenant:
                await dead_letter_event(
                    dead_letters, event_of[notification.event_id],
                    f"unknown tenant {notification.tenant_id}", "unknown_tenant",
                )  # fmt: skip
            # Tenants found without any mailbox in this batch: not looked up again for it.
            no_mailbox: set[str] = set()
            # The mail server unreachable once: the batch's other e-mails are not tried. Each
            # waited out SMTP_TIMEOUT_S in turn, and the next batch's in-app alerts behind them.
            server_down = False
            for notification, recipients in recorded.stored:
                NOTIFICATIONS.labels(notification.category, "in_app").inc()
                if (
                    "email" not in notification.deliveries
                    or not recipients
                    or notification.tenant_id in no_mailbox
                ):
                    continue
                if server_down:
                    NOTIFICATIONS.labels(notification.category, "email_failed").inc()
                    continue
                try:
                    delivery = await email(notification, recipients)
                except NoMailbox:
                    no_mailbox.add(notification.tenant_id)  # neither SMTP nor Gmail: in-app only
                    continue
                # ValueError: a header the e-mail library refuses (a line break in the title).
                except (OSError, smtplib.SMTPException, GmailApiError, MailboxRevoked,
                        GmailNotConfigured, ValueError) as exc:  # fmt: skip
                    logger.warning("notification e-mail failed: %r", exc)
                    NOTIFICATIONS.labels(notification.category, "email_failed").inc()
                    server_down = mailer.configured and isinstance(
                        exc, OSError | smtplib.SMTPServerDisconnected
                    )
                else:
                    NOTIFICATIONS.labels(notification.category, delivery).inc()
