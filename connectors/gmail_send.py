"""Sending e-mail to a lead through the tenant's connected Gmail, in the lead's thread."""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

from connectors.gmail import Mailbox
from connectors.gmail_mime import compose, parse_message, reply_subject
from connectors.gmail_store import GmailStore
from flexoraa.db import DB_ERRORS
from flexoraa.settings import Settings

logger = logging.getLogger(__name__)


class NoMailbox(RuntimeError):
    """The tenant has no connected Gmail mailbox."""


@dataclass(frozen=True)
class SentEmail:
    gmail_message_id: str
    thread_id: str
    rfc_message_id: str
    sender: str
    to: str


class EmailSender:
    def __init__(self, settings: Settings, store: GmailStore) -> None:
        self._settings = settings
        self._store = store

    async def send(
        self,
        tenant_id: str,
        *,
        to: str,
        body: str,
        lead_id: str | None = None,
        subject: str | None = None,
        reply_to_message_id: str | None = None,
    ) -> SentEmail:
        """Sends `body` to `to`; in the lead's Gmail thread when there is one (or the thread of
        the Gmail message `reply_to_message_id`), with In-Reply-To and References."""
        thread = await self._store.thread_of(lead_id) if lead_id else None
        # The thread's own mailbox if it is still connected, else the tenant's.
        mailbox_row = None
        if thread is not None:
            mailbox_row = await self._store.mailbox(tenant_id, thread.integration_id)
        if mailbox_row is None:
            mailbox_row = await self._store.mailbox(tenant_id)
        if mailbox_row is None:
            raise NoMailbox("no connected Gmail mailbox: connect one first")
        mailbox = Mailbox(self._settings, mailbox_row.tokens)
        # A thread id is the mailbox's own: the thread of a mailbox since disconnected is not
        # this one's, and Gmail refuses the send (the headers still thread it for the lead).
        same_mailbox = thread is not None and thread.integration_id == mailbox_row.integration_id
        thread_id = thread.thread_id if thread and same_mailbox else None
        in_reply_to = thread.last_message_id if thread else None
        references = thread.references if thread else None
        original_subject = thread.subject if thread else None
        if reply_to_message_id:
            original = await mailbox.fetch(reply_to_message_id)
            parsed = parse_message(base64.urlsafe_b64decode(original["raw"] + "=" * 3))
            thread_id = original.get("threadId", thread_id)
            in_reply_to, references = parsed.message_id, parsed.references
            original_subject = parsed.subject
        raw, rfc_message_id = compose(
            sender=mailbox_row.email,
            to=to,
            subject=subject or reply_subject(original_subject),
            body=body,
            in_reply_to=in_reply_to,
            references=references,
        )
        sent = await mailbox.send(raw, thread_id, rfc_message_id)
        try:
            await self._store.save_tokens(mailbox_row, mailbox.tokens)
        except DB_ERRORS as exc:
            # The mail is gone: raising here made the caller's retry (PostgreSQL unreachable)
            # send it again. The refresh token is unchanged, so the next send refreshes anew.
            logger.warning("refreshed Gmail token of %s not saved: %r", mailbox_row.email, exc)
        return SentEmail(
            sent["id"], sent.get("threadId", thread_id or ""), rfc_message_id, mailbox_row.email, to
        )
