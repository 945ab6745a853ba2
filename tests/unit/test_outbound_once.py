"""A command read again (a replay after a crash, an AI step redone after a top-up) goes to the
lead once, and a cancelled one never: the outbound agent remembers the ids it sent or had
cancelled per lead."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from flexoraa.settings import Settings
from schemas.messaging import CancelScheduled, OutboundCommand, OutboundMessage
from streams.agents.outbound import SENT_IDS_KEPT, ScheduledSends, Sender, SentCommands
from streams.timers import DeadlineIndex, Scheduler

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


def scheduled_with(sent: SentCommands) -> tuple[ScheduledSends, Table, Scheduler]:
    held = Table()
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    return ScheduledSends(cast(Any, held), scheduler, cast(Any, Topic()), sent), held, scheduler


def cancel(command: OutboundCommand) -> CancelScheduled:
    return CancelScheduled(event_id=str(uuid.uuid4()), tenant_id=TENANT,
                           occurred_at=datetime.now(UTC), lead_id=LEAD,
                           command_id=command.event_id)  # fmt: skip


async def test_a_command_cancelled_when_nothing_held_it_is_never_sent() -> None:
    # Dead-lettered when it fell due (no longer held), then cancelled by the rep, then its
    # letter replayed: once while still in the future, once with its time past.
    reports = Topic()
    sent = SentCommands(cast(Any, Table()))
    scheduled, held, scheduler = scheduled_with(sent)
    later = command("See you tomorrow").model_copy(
        update={"send_at": datetime.now(UTC) + timedelta(hours=1)}
    )
    scheduled.cancel(cancel(later))
    scheduled.hold(later)
    assert held == {}
    assert scheduler.pending(LEAD.encode()) == {}
    await sender_with(reports, sent).send(later.model_copy(update={"send_at": None}), None)
    assert reports.sent == []


async def test_a_cancelled_command_read_again_is_not_held_again() -> None:
    sent = SentCommands(cast(Any, Table()))
    scheduled, held, scheduler = scheduled_with(sent)
    later = command("See you tomorrow").model_copy(
        update={"send_at": datetime.now(UTC) + timedelta(hours=1)}
    )
    other = later.model_copy(update={"event_id": str(uuid.uuid4())})
    scheduled.hold(later)
    scheduled.hold(other)
    scheduled.cancel(cancel(later))
    assert list(held[LEAD.encode()]) == [other.event_id]
    scheduled.hold(later)  # a copy of the cancelled command, read after its cancellation
    assert list(held[LEAD.encode()]) == [other.event_id]
    assert list(scheduler.pending(LEAD.encode())) == [f"scheduled:{other.event_id}"]


def test_a_cancel_read_again_pushes_no_sent_id_out() -> None:
    table = Table()
    sent = SentCommands(cast(Any, table))
    commands = [command(f"message {i}") for i in range(SENT_IDS_KEPT)]
    for each in commands:
        sent.add(each)
    sent.settle(LEAD, commands[-1].event_id)  # cancelled after it went out, read again
    assert sent.contains(commands[0])


async def test_a_lead_with_nothing_held_any_more_leaves_no_entry() -> None:
    # An empty entry stayed, in memory and changelog, for every lead ever sent a scheduled
    # message.
    scheduled, held, _ = scheduled_with(SentCommands(cast(Any, Table())))
    later = command("Tomorrow").model_copy(
        update={"send_at": datetime.now(UTC) + timedelta(hours=1)}
    )
    scheduled.hold(later)
    assert LEAD.encode() in held
    scheduled.cancel(cancel(later))
    assert held == {}
