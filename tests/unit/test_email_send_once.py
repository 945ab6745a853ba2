"""An e-mail that went out is not sent again because saving its refreshed token failed: the
outbound agent retries a send while PostgreSQL is unreachable."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

import pytest

import connectors.gmail_send as gmail_send
from flexoraa.db import while_unreachable
from flexoraa.settings import Settings
from schemas.messaging import OutboundCommand
from streams.agents.outbound import Sender, SentCommands


class Mailbox:
    sent: list[bytes] = []

    def __init__(self, settings: Settings, tokens: Any) -> None:
        self.tokens = "refreshed"  # an hour on: the access token was refreshed

    async def send(self, raw: bytes, thread_id: str | None, rfc_id: str) -> dict[str, str]:
        Mailbox.sent.append(raw)
        return {"id": f"m{len(Mailbox.sent)}", "threadId": "t"}


class Row:
    email = "shop@example.com"
    tokens = "old"
    integration_id = "i"


class Store:
    async def thread_of(self, lead_id: str) -> None:
        return None

    async def mailbox(self, tenant_id: str, integration_id: str | None = None) -> Row:
        return Row()

    async def save_tokens(self, row: Row, tokens: Any) -> None:
        raise ConnectionResetError("PostgreSQL went away")


class Topic:
    async def send(self, *, key: bytes, value: bytes) -> None:
        pass


async def test_a_sent_mail_whose_token_cannot_be_saved_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gmail_send, "Mailbox", Mailbox)
    settings = Settings()
    email = gmail_send.EmailSender(settings, cast(Any, Store()))
    sender = Sender(settings, cast(Any, None), cast(Any, None), cast(Any, Topic()),
                    cast(Any, Topic()), email, SentCommands(cast(Any, {})))  # fmt: skip
    tenant, lead = str(uuid.uuid4()), str(uuid.uuid4())
    command = OutboundCommand(event_id=str(uuid.uuid4()), tenant_id=tenant,
                              occurred_at=datetime.now(UTC), lead_id=lead, text="Hello",
                              sent_by="sdr")  # fmt: skip
    session = {"tenant_id": tenant, "channel": "email", "contact": "lead@example.com",
               "last_customer_message_ms": 0}  # fmt: skip
    await while_unreachable(sender.send, command, session)  # as the outbound agent calls it
    assert len(Mailbox.sent) == 1
