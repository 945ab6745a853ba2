"""The Gmail poller: incremental history sync of every connected mailbox, every minute.

Each pass claims the mailboxes that are due with a lease in PostgreSQL (SKIP LOCKED), so
pollers in several processes share them and never poll one mailbox twice at once. For each:
`history.list` from the stored historyId (every page, INBOX and SENT messageAdded), fetch and
parse the new messages, publish them as inbound e-mail events (and the replies reps wrote in
Gmail itself as outbound messages) and, only once Kafka acknowledged all of them, advance the
cursor. A crash before that re-polls the same messages, whose event ids are
derived from the Gmail message id, so nothing is ingested twice. A 404 (historyId too old)
triggers a full resync of the last GMAIL_RESYNC_DAYS, deduplicated the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import socket
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.gmail import (
    GmailApiError,
    HistoryExpired,
    Mailbox,
    MailboxRevoked,
    MessageGone,
)
from connectors.gmail_mime import ParsedMail, composed_here, parse_message
from connectors.gmail_store import GmailStore, MailboxRow
from flexoraa.db import DB_ERRORS
from flexoraa.kafka import EventPublisher, PublishUnavailable
from flexoraa.settings import Settings
from schemas.events import InboundMessage, is_supported_time
from schemas.ids import name_based_id
from schemas.messaging import OutboundMessage
from schemas.notifications import Notification
from schemas.topics import TopicNames
from streams.rules.identity import (
    InvalidContact,
    inbound_event_id,
    lead_id_for,
    normalize_contact,
)

logger = logging.getLogger(__name__)
# Gmail's own clients (web, apps) end every Message-ID so: mail a person wrote in Gmail.
_GMAIL_CLIENT_MESSAGE_ID = "@mail.gmail.com>"
# Mailbox domains shared by everyone: a visitor's address on one is no colleague's.
_CONSUMER_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
# PostgreSQL or Kafka away for a moment: a pass gives up and the next one tries again.
_PASS_ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, PublishUnavailable)
_NOTIFY_NAMESPACE = uuid.UUID("0c6f2d7e-4b1a-4e8f-a3d5-9e2b7c1f6a40")
_REPLY_NAMESPACE = uuid.UUID("5b0e9a43-8c21-4d6f-b7e2-31f4a9c8d0e6")
_MAX_TEXT = 16_384

# (lead_id, tenant_id, integration_id, thread_id, message_id, references, subject)
ThreadRow = tuple[str, str, str, str, str | None, str | None, str]


class GmailPoller:
    def __init__(
        self,
        settings: Settings,
        store: GmailStore,
        publisher: EventPublisher,
        owner: str | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._publisher = publisher
        self._topics = TopicNames(settings.topic_prefix)
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                polled = await self.poll_due()
            except _PASS_ERRORS as exc:
                # PostgreSQL or Kafka away for a moment: the next pass tries again.
                logger.warning("poll pass failed (%r); trying again", exc)
                polled = 0
            if not polled:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def poll_due(self) -> int:
        """Polls every due mailbox this poller can lease; how many it polled."""
        mailboxes = await self._store.claim_due(
            self.owner, self._settings.gmail_lease_s, self._settings.gmail_poll_concurrency
        )
        await asyncio.gather(*(self.poll(mailbox) for mailbox in mailboxes))
        return len(mailboxes)

    async def poll(self, row: MailboxRow) -> None:
        # The lease renewed while the poll runs: a full resync reads a week of mail one message
        # at a time and outlasted it, another poller then took the mailbox and read it all
        # again, and the first one's cursor was refused.
        heartbeat = asyncio.create_task(self._keep_lease(row))
        try:
            await self._poll(row)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _keep_lease(self, row: MailboxRow) -> None:
        lease_s = self._settings.gmail_lease_s
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                if not await self._store.renew(row, self.owner, lease_s):
                    return  # taken over: the poll's cursor will be refused, and it says so
            except _PASS_ERRORS as exc:
                logger.warning("lease on %s not renewed (%r); trying again", row.email, exc)

    async def _poll(self, row: MailboxRow) -> None:
        interval = self._settings.gmail_poll_interval_s
        try:
            client = Mailbox(self._settings, row.tokens)
            history_id = row.history_id
            try:
                if history_id is None:
                    raise HistoryExpired("no cursor yet")
                ids, newest = await client.added_since(history_id)
            except HistoryExpired:
                ids, newest = await self._full_sync_ids(client)
            threads = await self._ingest(row, client, ids)
            await self._store.remember_threads(threads)
            if not await self._store.advance(row, self.owner, newest, interval, client.tokens):
                logger.warning("lease on %s lost before the cursor moved", row.email)
        except MailboxRevoked as exc:
            logger.warning("mailbox %s disconnected: %s", row.email, exc)
            await self._store.disconnect(row, self.owner, str(exc))
            await self._notify_disconnected(row, str(exc))
        except (GmailApiError, PublishUnavailable, OSError) as exc:
            logger.warning("poll of %s failed: %s", row.email, exc)
            await self._store.failed(row, self.owner, str(exc), interval)
        except _PASS_ERRORS:
            raise  # PostgreSQL away: the pass's, retried by `run`
        except Exception as exc:
            # A bug met on one mailbox's mail stopped the poller, and Gmail intake with it for
            # every tenant, at every restart. Marked failed: retried, and visible in the
            # integration's status.
            logger.exception("poll of %s failed", row.email)
            await self._store.failed(row, self.owner, f"{type(exc).__name__}: {exc}", interval)

    async def _full_sync_ids(self, client: Mailbox) -> tuple[list[str], int]:
        # The profile's historyId first: mail arriving during the listing is read next time.
        _, current = await client.profile()
        since = datetime.now(UTC) - timedelta(days=self._settings.gmail_resync_days)
        return await client.mail_since(since), current

    async def _ingest(self, row: MailboxRow, client: Mailbox, ids: list[str]) -> list[ThreadRow]:
        threads: dict[str, ThreadRow] = {}
        sent: list[tuple[str, dict[str, Any], ParsedMail]] = []
        for message_id in ids:
            try:
                fetched = await client.fetch(message_id)
            except MessageGone:
                # Deleted since history.list named it: a 404 on every poll held the mailbox's
                # cursor, and its intake, for good.
                logger.info("message %s of %s deleted before it was read", message_id, row.email)
                continue
            labels = fetched.get("labelIds", [])
            if "DRAFT" in labels:
                continue
            try:
                mail = parse_message(base64.urlsafe_b64decode(fetched["raw"] + "=" * 3))
            except Exception:  # the stdlib parser raises many kinds on hostile mail
                # Skipped, not retried: it would fail the mailbox's every poll. It stays in the
                # mailbox, where the rep reads it.
                logger.exception("message %s of %s cannot be parsed; skipped", message_id,
                                 row.email)  # fmt: skip
                continue
            if _form_notice_sent_as_the_mailbox(row.email, labels, mail):
                assert mail.reply_to is not None
                mail = replace(mail, sender=mail.reply_to, sender_name=mail.reply_to_name)
            elif "SENT" in labels:
                # A rep's reply written in Gmail; what the pipeline sent it recorded already,
                # and the mailbox's own automatic answers (a vacation responder) answer no one.
                if not composed_here(mail.message_id) and mail.automated is None:
                    sent.append((message_id, fetched, mail))
                continue
            if mail.sender == row.email:
                continue  # the mailbox's own mail, in its inbox
            if mail.automated is not None:
                logger.info("message %s of %s is automated (%s); not a lead", message_id,
                            row.email, mail.automated)  # fmt: skip
                continue
            try:
                event = self._event(row, message_id, fetched, mail)
            except Exception:
                # A mail no event can carry (a sender address past any limit, say): skipped
                # like an unparseable one. Raised, it failed the poll and held the cursor, and
                # the mailbox's intake stopped for good on that one mail.
                logger.exception("message %s of %s cannot be an inbound event; skipped",
                                 message_id, row.email)  # fmt: skip
                continue
            if event is None:
                continue
            lead_id = event.lead_id
            await self._publisher.publish(
                self._topics.inbound_messages, lead_id.encode(), event.model_dump_json().encode()
            )
            threads[lead_id] = (lead_id, row.tenant_id, row.integration_id,
                                fetched.get("threadId") or message_id, mail.message_id,
                                mail.references, mail.subject)  # fmt: skip
        await self._record_replies(row, sent, set(threads))
        return list(threads.values())

    async def _record_replies(
        self, row: MailboxRow, sent: list[tuple[str, dict[str, Any], ParsedMail]], seen: set[str]
    ) -> None:
        """Publishes the mail a rep sent from Gmail to leads of the tenant as the outbound
        messages it is: it ends their leak waits and joins their history. Unseen, a lead a rep
        answered in Gmail leaked all the same, and the AI wrote to it again.

        Only to leads (the senders of this poll's mail, or leads PostgreSQL has): mail to a
        colleague or a supplier is none of the pipeline's business."""
        recipients: dict[str, list[str]] = {}
        for message_id, _, mail in sent:
            leads: list[str] = []
            for address in mail.to:
                try:
                    contact = normalize_contact("email", address)
                except InvalidContact:
                    continue
                lead_id = lead_id_for(row.tenant_id, "email", contact)
                if contact != row.email and lead_id not in leads:
                    leads.append(lead_id)
            recipients[message_id] = leads
        unseen = {lead for leads in recipients.values() for lead in leads} - seen
        known = seen | await self._store.known_leads(row.tenant_id, sorted(unseen))
        for message_id, fetched, mail in sent:
            for lead_id in recipients[message_id]:
                if lead_id not in known:
                    continue
                event_id = name_based_id(
                    _REPLY_NAMESPACE, f"{row.tenant_id}|{message_id}|{lead_id}"
                )
                reply = OutboundMessage(
                    event_id=event_id, tenant_id=row.tenant_id, occurred_at=_mail_time(fetched),
                    lead_id=lead_id, command_id=event_id, attempt=1, channel="email",
                    send_kind="freeform", status="accepted", channel_message_id=message_id,
                    text=(mail.text or mail.subject)[:_MAX_TEXT], sent_by="sdr",
                )  # fmt: skip
                await self._publisher.publish(
                    self._topics.outbound_messages, lead_id.encode(),
                    reply.model_dump_json().encode(),
                )  # fmt: skip

    def _event(
        self, row: MailboxRow, message_id: str, fetched: dict[str, Any], mail: ParsedMail
    ) -> InboundMessage | None:
        """The inbound event of one fetched mail, or None for a mail without a usable
        sender."""
        try:
            contact = normalize_contact("email", mail.sender)
        except InvalidContact:
            logger.warning("message %s without a usable sender skipped", message_id)
            return None
        lead_id = lead_id_for(row.tenant_id, "email", contact)
        received = _mail_time(fetched)
        text = mail.text or mail.subject
        if mail.attachments:
            text = f"{text}\n[attachments: {', '.join(mail.attachments)}]".strip()
        return InboundMessage(
            event_id=inbound_event_id(row.tenant_id, "email", message_id),
            tenant_id=row.tenant_id,
            occurred_at=received,
            lead_id=lead_id,
            channel="email",
            contact=contact,
            contact_name=mail.sender_name[:200] if mail.sender_name else None,
            text=text[:_MAX_TEXT],
            message_type="email",
            channel_message_id=message_id,
            channel_account_id=row.integration_id,
            received_at=datetime.now(UTC),
        )

    async def _notify_disconnected(self, row: MailboxRow, reason: str) -> None:
        # One notice per authorisation lost: a retried poll repeats the id (the stored tokens
        # are the same), but a reconnect's tokens make the next revocation another notice
        # (keyed on the mailbox and reason alone, it was dropped as a duplicate of the first).
        tokens = f"{row.tokens.access_token}|{row.tokens.refresh_token}"
        grant = hashlib.sha256(tokens.encode()).hexdigest()[:16]
        notification = Notification(
            event_id=name_based_id(_NOTIFY_NAMESPACE, f"{row.integration_id}|{reason}|{grant}"),
            tenant_id=row.tenant_id,
            occurred_at=datetime.now(UTC),
            audience="admins",
            category="integration_disconnected",
            title=f"Gmail {row.email} disconnected",
            body="Google no longer accepts this mailbox's authorisation, so its mail is not "
            "read. Connect it again from the integrations page.",
            data={"integration_id": row.integration_id, "account": row.email},
        )
        try:
            await self._publisher.publish(
                self._topics.notifications,
                row.tenant_id.encode(),
                notification.model_dump_json().encode(),
            )
        except PublishUnavailable:
            logger.warning("disconnection notice for %s not published", row.email)


def _mail_time(fetched: dict[str, Any]) -> datetime:
    """When Gmail received (or sent) a fetched message."""
    at = datetime.fromtimestamp(int(fetched.get("internalDate", 0)) / 1000, UTC)
    # Imported mail can carry any date; an event cannot (schemas.events).
    return at if is_supported_time(at) else datetime.now(UTC)


def _form_notice_sent_as_the_mailbox(mailbox: str, labels: list[str], mail: ParsedMail) -> bool:
    """A web form's notice sent through the mailbox's own account (a site's form plugin
    mailing through Gmail, From and To the mailbox, the visitor in Reply-To): the visitor's
    message, and the visitor the lead. Skipped as the mailbox's own mail (and, in SENT, as no
    rep's reply to a lead), the lead was lost. Reply-To is trusted here only because SENT
    says the account itself sent it: from outside, anyone can write From the mailbox.

    Not a note a rep wrote to the mailbox in Gmail itself (its clients' Message-ID), nor one
    whose Reply-To is on the business's own domain (an account set to answer to sales@)."""
    return (
        "SENT" in labels
        and mail.from_address == mailbox
        and bool(mail.to)
        and all(address == mailbox for address in mail.to)
        and mail.reply_to is not None
        and mail.reply_to != mailbox
        and mail.automated is None
        and not composed_here(mail.message_id)
        and not (mail.message_id or "").lower().endswith(_GMAIL_CLIENT_MESSAGE_ID)
        and not _same_business_domain(mailbox, mail.reply_to)
    )


def _same_business_domain(mailbox: str, address: str) -> bool:
    domain = mailbox.rpartition("@")[2]
    return domain not in _CONSUMER_DOMAINS and address.rpartition("@")[2] == domain
