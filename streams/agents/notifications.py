"""The notifications agent: every Notification becomes an in-app row and e-mails.

Recipients: "admins" are the tenant's `tenant_admins`; "sdr" is one SDR of the roster. The
in-app row is written first and idempotently (its id is the event id), so a redelivered
notification is stored once; e-mail is best effort after it (a failure is logged and counted,
the stream goes on — a broken mail server must not stop alerts from being recorded).
"""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Awaitable, Callable

import asyncpg
from faust.types import AppT, StreamT, TopicT
from pydantic import ValidationError

from connectors.gmail import GmailApiError, GmailNotConfigured, MailboxRevoked
from connectors.gmail_send import EmailSender, NoMailbox
from connectors.mailer import Mailer
from flexoraa.db import while_unreachable
from schemas.notifications import Notification
from streams.dead_letters import dead_letter_event, describe_validation_error
from streams.metrics import NOTIFICATIONS

logger = logging.getLogger(__name__)


class NotificationStore:
    def __init__(self, pool_factory: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._pool_factory = pool_factory

    async def record(self, notification: Notification) -> list[str] | None:
        """Store the in-app row; the recipients' addresses, or None if it was stored before."""
        pool = await self._pool_factory()
        async with pool.acquire() as conn:
            if notification.audience == "sdr":
                recipient = f"sdr:{notification.sdr_id}"
                emails = await conn.fetch(
                    "SELECT email FROM sdrs WHERE sdr_id = $1 AND tenant_id = $2",
                    notification.sdr_id,
                    notification.tenant_id,
                )
            else:
                recipient = "admins"
                emails = await conn.fetch(
                    "SELECT email FROM tenant_admins WHERE tenant_id = $1", notification.tenant_id
                )
            inserted = await conn.fetchval(
                """INSERT INTO notifications (notification_id, tenant_id, recipient, kind, title,
                                              body, data, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                   ON CONFLICT (notification_id) DO NOTHING RETURNING 1""",
                notification.event_id,
                notification.tenant_id,
                recipient,
                notification.category,
                notification.title,
                notification.body,
                notification.data,
                notification.occurred_at,
            )
        if inserted is None:
            return None
        return [row["email"] for row in emails]


def register(
    app: AppT,
    *,
    notifications: TopicT,
    dead_letters: TopicT,
    store: NotificationStore,
    mailer: Mailer,
    gmail: EmailSender,
) -> None:
    async def email(notification: Notification, recipients: list[str]) -> str:
        """SMTP when configured, else the tenant's own connected Gmail; which one it was."""
        if mailer.configured:
            await mailer.send(recipients, notification.title, notification.body)
            return "email"
        await gmail.send(notification.tenant_id, to=", ".join(recipients),
                         subject=notification.title, body=notification.body)  # fmt: skip
        return "gmail"

    @app.agent(notifications, name="notifications")
    async def deliver(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                notification = Notification.model_validate_json(event.value)
            except ValidationError as exc:
                await dead_letter_event(
                    dead_letters, event, describe_validation_error(exc), "invalid_event"
                )
                continue
            recipients = await while_unreachable(store.record, notification)
            if recipients is None:
                continue  # delivered before
            NOTIFICATIONS.labels(notification.category, "in_app").inc()
            if "email" not in notification.deliveries or not recipients:
                continue
            try:
                delivery = await email(notification, recipients)
            except NoMailbox:
                continue  # neither SMTP nor a connected Gmail: in-app only
            except (OSError, smtplib.SMTPException, GmailApiError, MailboxRevoked,
                    GmailNotConfigured) as exc:  # fmt: skip
                logger.warning("notification e-mail failed: %r", exc)
                NOTIFICATIONS.labels(notification.category, "email_failed").inc()
            else:
                NOTIFICATIONS.labels(notification.category, delivery).inc()
