"""A deadline handler changes its table only after sending its effects.

The worker's producer holds a changelog write until the records sent *before* it are
acknowledged, not those sent after. A handler that marked its state first could leave, after a
kill -9, a table saying "done" for effects that never went out (the kill -9 fault test: a
paused tenant's lead that never leaked).
"""

from __future__ import annotations

import json
import uuid
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, cast

from schemas.messaging import DeadlineReached, OutboundCommand
from streams.agents.leakage import LeakActions
from streams.agents.outbound import ScheduledSends, SentCommands
from streams.locks import KeyLocks
from streams.timers import DeadlineIndex, Scheduler

LEAD = str(uuid.uuid4())
KEY = LEAD.encode()
TENANT = str(uuid.uuid4())
SESSION = {"tenant_id": TENANT, "channel": "whatsapp", "last_customer_message_ms": 1_000}


class JournalTable(dict[bytes, Any]):
    def __init__(self, name: str, journal: list[str]) -> None:
        super().__init__()
        self._name = name
        self._journal = journal

    def __setitem__(self, key: bytes, value: Any) -> None:
        self._journal.append(f"write {self._name}")
        super().__setitem__(key, value)


class JournalTopic:
    def __init__(self, journal: list[str]) -> None:
        self._journal = journal

    async def send(self, *, key: bytes, value: bytes) -> None:
        self._journal.append(f"send {json.loads(value).get('type', 'record')}")


class PausedGate:
    def __init__(self) -> None:
        self._locks = KeyLocks()

    async def allows(self, tenant_id: str) -> bool:
        return False

    def lead_lock(self, key: bytes) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(key)


class MailboxTenants:
    """The tenant settings leak actions ask: whether an e-mail lead can be written to."""

    def __init__(self, connected: bool) -> None:
        self.connected = connected

    async def mailbox_connected(self, tenant_id: str) -> bool:
        return self.connected


def fired(deadline: str, due_ms: int) -> DeadlineReached:
    now = datetime.now(UTC)
    return DeadlineReached(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                           lead_id=LEAD, deadline=deadline, due_ms=due_ms,
                           fired_at=now)  # fmt: skip


def leak_actions(leakage: JournalTable, topic: JournalTopic) -> LeakActions:
    """A paused tenant's leak actions: every effect is a send on `topic`, none needs the AI."""
    return LeakActions(
        leakage=cast(Any, leakage), qualification=cast(Any, {}), router=cast(Any, None),
        lead_events=cast(Any, topic), outbound_commands=cast(Any, topic),
        notifications=cast(Any, topic), gate=cast(Any, PausedGate()), meter=cast(Any, None),
        tenants=cast(Any, MailboxTenants(connected=True)),
        scheduler=Scheduler(cast(Any, {}), DeadlineIndex()),
    )  # fmt: skip


async def test_a_leak_is_marked_fired_only_after_it_was_reported() -> None:
    journal: list[str] = []
    leakage = JournalTable("leakage", journal)
    dict.__setitem__(leakage, KEY, {"waiting_since_ms": 1_000, "due_ms": 6_000, "fired": False})
    topic = JournalTopic(journal)
    actions = leak_actions(leakage, topic)
    await actions.on_leak(KEY, fired("leak", 6_000), SESSION)
    assert journal.index("write leakage") > journal.index("send leak_detected")
    assert journal[-1] == "write leakage"
    assert leakage[KEY]["fired"] is True


async def test_a_leak_handled_while_the_lead_was_answered_does_not_bring_the_wait_back() -> None:
    journal: list[str] = []
    leakage = JournalTable("leakage", journal)
    dict.__setitem__(leakage, KEY, {"waiting_since_ms": 1_000, "due_ms": 6_000, "fired": False})

    class AnsweredMeanwhile(JournalTopic):
        async def send(self, *, key: bytes, value: bytes) -> None:
            await super().send(key=key, value=value)
            leakage.pop(KEY, None)  # the reply agent ended the wait while the leak was sent

    topic = AnsweredMeanwhile(journal)
    actions = leak_actions(leakage, topic)
    await actions.on_leak(KEY, fired("leak", 6_000), SESSION)
    assert KEY not in leakage


async def test_a_wait_moved_to_an_earlier_message_during_its_leak_is_marked_fired() -> None:
    # Its moved deadline fires next: unmarked, the one wait leaked twice.
    journal: list[str] = []
    leakage = JournalTable("leakage", journal)
    dict.__setitem__(leakage, KEY, {"waiting_since_ms": 1_000, "due_ms": 6_000, "fired": False})

    class MovedMeanwhile(JournalTopic):
        async def send(self, *, key: bytes, value: bytes) -> None:
            await super().send(key=key, value=value)
            # The waits' handler read an earlier message of the lead while the leak was sent.
            dict.__setitem__(leakage, KEY, {"waiting_since_ms": 500, "due_ms": 5_500,
                                            "fired": False})  # fmt: skip

    actions = leak_actions(leakage, MovedMeanwhile(journal))
    await actions.on_leak(KEY, fired("leak", 6_000), SESSION)
    assert leakage[KEY] == {"waiting_since_ms": 500, "due_ms": 5_500, "fired": True}


async def test_a_leak_fired_at_a_deadline_not_its_waits_is_set_to_its_due() -> None:
    # The wait was left for a later message (a reply answered the first) and the move of its
    # deadline lost in a crash: reported then, a rep answering the later message in time
    # had a false leak.
    journal: list[str] = []
    leakage = JournalTable("leakage", journal)
    dict.__setitem__(leakage, KEY, {"waiting_since_ms": 4_000, "due_ms": 9_000, "fired": False})
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    scheduler.set(KEY, {"leak": 6_000})
    actions = LeakActions(
        leakage=cast(Any, leakage), qualification=cast(Any, {}), router=cast(Any, None),
        lead_events=cast(Any, JournalTopic(journal)), outbound_commands=cast(Any, None),
        notifications=cast(Any, None), gate=cast(Any, PausedGate()), meter=cast(Any, None),
        tenants=cast(Any, MailboxTenants(connected=True)), scheduler=scheduler,
    )  # fmt: skip
    await actions.on_leak(KEY, fired("leak", 6_000), SESSION)
    assert journal == []
    assert scheduler.pending(KEY) == {"leak": 9_000}
    assert leakage[KEY]["fired"] is False
    # Moved earlier instead, and the later deadline fires first: reported at its own due
    # (next tick), not under this one's ids as well.
    scheduler.set(KEY, {"leak": 12_000})
    await actions.on_leak(KEY, fired("leak", 12_000), SESSION)
    assert journal == []
    assert scheduler.pending(KEY) == {"leak": 9_000}


async def test_a_scheduled_command_leaves_the_table_only_after_it_was_sent() -> None:
    journal: list[str] = []
    held = JournalTable("scheduled", journal)
    command = OutboundCommand(event_id=str(uuid.uuid4()), tenant_id=TENANT,
                              occurred_at=datetime.now(UTC), lead_id=LEAD, text="Hello again",
                              sent_by="sdr", purpose="reply",
                              send_at=datetime.now(UTC))  # fmt: skip
    other = command.model_copy(update={"event_id": str(uuid.uuid4())})
    dict.__setitem__(held, KEY, {command.event_id: command.model_dump_json()})
    sent: list[OutboundCommand] = []

    class OutboundCommands:
        async def send(self, *, key: bytes, value: bytes) -> None:
            journal.append("send command")
            sent.append(OutboundCommand.model_validate_json(value))
            # Another command of the lead is held while this one is being sent.
            dict.__setitem__(held, KEY, {**held[KEY], other.event_id: other.model_dump_json()})

    scheduled = ScheduledSends(cast(Any, held), Scheduler(cast(Any, {}), DeadlineIndex()),
                               cast(Any, OutboundCommands()),
                               SentCommands(cast(Any, {})))  # fmt: skip
    due = scheduled.handlers()["scheduled"]
    await due(KEY, fired(f"scheduled:{command.event_id}", 6_000), SESSION)
    assert journal == ["send command", "write scheduled"]
    assert list(held[KEY]) == [other.event_id]
    # Back to the outbound agent as the same command, due now.
    assert sent == [command.model_copy(update={"send_at": None})]


async def test_a_lead_reassigned_for_a_leak_is_the_new_sdrs_in_its_interview_too() -> None:
    # Its later leak alerts went to the SDR it was taken from.
    from connectors.sdrs import Assignment, Reassignment

    class Router:
        async def reassign(self, *args: Any) -> Reassignment:
            return Reassignment(Assignment("sdr-a", "A", "a@acme.test", False),
                                Assignment("sdr-b", "B", "b@acme.test", True))  # fmt: skip

    journal: list[str] = []
    leakage = JournalTable("leakage", journal)
    dict.__setitem__(leakage, KEY, {"waiting_since_ms": 1_000, "due_ms": 6_000, "fired": False})
    interview = {KEY: {"score": 35.0, "sdr_id": "sdr-a", "turn": 3}}  # WARM: reassigned
    topic = JournalTopic(journal)
    actions = LeakActions(
        leakage=cast(Any, leakage), qualification=cast(Any, interview), router=cast(Any, Router()),
        lead_events=cast(Any, topic), outbound_commands=cast(Any, topic),
        notifications=cast(Any, topic), gate=cast(Any, PausedGate()), meter=cast(Any, None),
        tenants=cast(Any, MailboxTenants(connected=True)),
        scheduler=Scheduler(cast(Any, {}), DeadlineIndex()),
    )  # fmt: skip
    await actions.on_leak(KEY, fired("leak", 6_000), SESSION)
    assert interview[KEY] == {"score": 35.0, "sdr_id": "sdr-b", "turn": 3}
