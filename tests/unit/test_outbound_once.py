"""A command read again (a replay after a crash, an AI step redone after a top-up) goes to the
lead once: the outbound agent remembers the ids it sent per lead."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

from flexoraa.settings import Settings
from schemas.messaging import OutboundCommand, OutboundMessage
from streams.agents.outbound import SENT_IDS_KEPT, Sender, SentCommands

LEAD = str(uuid.uuid4())
TENANT = str(uuid.uuid4())


class Table(dict[bytes, Any]):
    pass


class Topic:
    def __init__(self) -> None:
        self.sent: list[OutboundMessage] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append(OutboundMessage.model_validate_json(value))


def command(text: str = "What budget do you have in mind?") -> OutboundCommand:
    return OutboundCommand(event_id=str(uuid.uuid4()), tenant_id=TENANT,
                           occurred_at=datetime.now(UTC), lead_id=LEAD, text=text,
                           sent_by="ai", purpose="qualification")  # fmt: skip


def sender_with(reports: Topic, sent: SentCommands) -> Sender:
    # No session: every send ends in a "failed" report without reaching a channel, which is
    # enough to count the sends.
    return Sender(Settings(), cast(Any, None), cast(Any, None), cast(Any, reports),
                  cast(Any, Topic()), cast(Any, None), sent)  # fmt: skip


async def test_a_command_read_again_is_not_sent_again() -> None:
    reports = Topic()
    sender = sender_with(reports, SentCommands(cast(Any, Table())))
    question = command()
    await sender.send(question, None)
    await sender.send(question, None)
    await sender.send(command("And your timeline?"), None)
    assert [r.command_id for r in reports.sent][:1] == [question.event_id]
    assert len(reports.sent) == 2


async def test_only_the_last_ids_of_a_lead_are_kept() -> None:
    table = Table()
    sent = SentCommands(cast(Any, table))
    commands = [command(f"message {i}") for i in range(SENT_IDS_KEPT + 5)]
    for each in commands:
        sent.add(each)
    assert len(table[LEAD.encode()]) == SENT_IDS_KEPT
    assert sent.contains(commands[-1])
    assert not sent.contains(commands[0])
