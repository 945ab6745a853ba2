"""A deadline failing for a reason of its own is dead-lettered and cancelled; its kind leaves
nothing held for good: a scheduled command is dead-lettered in its place and dropped, a recovery
sequence goes on with its next step, and a resume keeps the lead's other deferred actions."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import orjson
import pytest

from schemas.events import DeadLetter
from schemas.messaging import DeadlineReached, OutboundCommand
from streams.agents.deadlines import DeadLettered, DeadlineActions, DeadlineHandler, Evidence
from streams.agents.outbound import ScheduledSends, SentCommands
from streams.agents.recovery import Recovery
from streams.agents.tokens import RESUME_DEADLINE, AiGate, TenantStatusView
from streams.poison import PoisonRecords
from streams.rules.recovery import STRATEGIES
from streams.timers import DeadlineIndex, Scheduler

LEAD = str(uuid.uuid4())
KEY = LEAD.encode()
TENANT = str(uuid.uuid4())
SESSION = {
    "tenant_id": TENANT,
    "contact_name": "Asha",
    "channel": "email",
    "last_customer_message_ms": 0,
}
COMMANDS = "acme.outbound-commands"


@dataclass(frozen=True)
class Record:
    topic: str = "acme.deadlines"
    partition: int = 0
    offset: int = 7
    key: bytes | None = None
    value: bytes = b"{}"


@dataclass
class Topic:
    sent: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = "acme.topic"

    def get_topic_name(self) -> str:
        return self.name

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append((key, value))

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter.model_validate_json(value) for _, value in self.sent]


class OpenView:
    def is_paused(self, tenant_id: str) -> bool:
        return False

    async def wait_loaded(self, timeout_s: float = 30.0) -> None:
        return None


def fired(deadline: str, due_ms: int) -> DeadlineReached:
    now = datetime.now(UTC)
    return DeadlineReached(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                           lead_id=LEAD, deadline=deadline, due_ms=due_ms,
                           fired_at=now)  # fmt: skip


def actions(
    scheduler: Scheduler,
    handlers: dict[str, DeadlineHandler],
    dead_lettered: dict[str, DeadLettered],
) -> tuple[DeadlineActions, Topic]:
    dead_letters = Topic()
    poison = PoisonRecords(cast(Any, dead_letters), policy="dead_letter", is_stopping=lambda: False)
    sessions = {KEY: SESSION}
    return DeadlineActions(scheduler, sessions, handlers, poison, dead_lettered), dead_letters


def raw_of(letter: DeadLetter) -> bytes:
    return base64.b64decode(letter.raw_base64)


async def test_the_kinds_evidence_is_dead_lettered_before_its_state_is_settled() -> None:
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    scheduler.set(KEY, {"nudge": 1_000, "other": 2_000})
    settled: list[int] = []

    async def failing(key: bytes, fired: DeadlineReached, session: Any) -> None:
        raise ValueError("a value this lead carries")

    acting, dead_letters = actions(
        scheduler,
        {"nudge": failing},
        # `settle` sees how many dead letters were sent when it runs: the dead letter first.
        {"nudge": DeadLettered(settle=lambda key, _: settled.append(len(dead_letters.sent)),
                               evidence=lambda key, _: Evidence(b"what the deadline held"))},
    )  # fmt: skip
    await acting.act_on_or_dead_letter(fired("nudge", 1_000), Record())
    [letter] = dead_letters.dead_letters()
    assert raw_of(letter) == b"what the deadline held"
    assert (letter.source_topic, letter.partition, letter.offset) == ("acme.deadlines", 0, 7)
    assert letter.key_base64 == base64.b64encode(KEY).decode()
    assert "ValueError: a value this lead carries" in letter.reason
    assert settled == [1]
    assert scheduler.pending(KEY) == {"other": 2_000}  # only the failed deadline is cancelled


async def test_a_kind_without_evidence_dead_letters_the_deadline_itself() -> None:
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    scheduler.set(KEY, {"nudge": 1_000})

    async def failing(key: bytes, fired: DeadlineReached, session: Any) -> None:
        raise KeyError("step")

    acting, dead_letters = actions(scheduler, {"nudge": failing}, {})
    deadline = fired("nudge", 1_000)
    await acting.act_on_or_dead_letter(deadline, Record())
    [letter] = dead_letters.dead_letters()
    assert DeadlineReached.model_validate_json(raw_of(letter)) == deadline
    assert scheduler.pending(KEY) == {}


async def test_a_transient_failure_is_raised_and_nothing_is_settled() -> None:
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    scheduler.set(KEY, {"nudge": 1_000})
    settled: list[bytes] = []

    async def failing(key: bytes, fired: DeadlineReached, session: Any) -> None:
        raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")

    kind = DeadLettered(settle=lambda key, _: settled.append(key))
    acting, dead_letters = actions(scheduler, {"nudge": failing}, {"nudge": kind})
    with pytest.raises(asyncpg.exceptions.DeadlockDetectedError):
        await acting.act_on_or_dead_letter(fired("nudge", 1_000), Record())
    assert dead_letters.sent == []
    assert settled == []
    assert scheduler.pending(KEY) == {"nudge": 1_000}


async def test_a_scheduled_command_that_cannot_go_out_is_dead_lettered_and_no_longer_held() -> None:
    table: dict[bytes, Any] = {}
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    outbound = Topic(name=COMMANDS)
    scheduled = ScheduledSends(cast(Any, table), scheduler, cast(Any, outbound),
                               SentCommands(cast(Any, {})))  # fmt: skip
    later = datetime.now(UTC) + timedelta(hours=1)
    good = OutboundCommand(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=later,
                           lead_id=LEAD, text="See you tomorrow", sent_by="sdr",
                           purpose="reply", send_at=later)  # fmt: skip
    scheduled.hold(good)
    # Held by an earlier release whose command no longer decodes.
    broken_id = str(uuid.uuid4())
    broken = b'{"event_id": "' + broken_id.encode() + b'", "text": 42}'
    table[KEY] = {**table[KEY], broken_id: broken.decode()}
    scheduler.set(KEY, {f"scheduled:{broken_id}": 1_000})

    acting, dead_letters = actions(scheduler, scheduled.handlers(), scheduled.dead_lettered())
    await acting.act_on_or_dead_letter(fired(f"scheduled:{broken_id}", 1_000), Record())

    [letter] = dead_letters.dead_letters()
    assert raw_of(letter) == broken  # the command itself, not only its deadline
    # From the commands topic, where a replay puts it back; no offset of that topic is known.
    assert (letter.source_topic, letter.partition, letter.offset) == (COMMANDS, None, None)
    assert list(table[KEY]) == [good.event_id]  # dropped; the lead's other command still held
    assert list(scheduler.pending(KEY)) == [f"scheduled:{good.event_id}"]
    assert outbound.sent == []


class FailingMeter:
    """Charges every step but the one named, which fails for a reason of its own."""

    def __init__(self, failing_step: int) -> None:
        self.failing_step = failing_step
        self.steps = 0

    async def charge(self, **usage: Any) -> int:
        self.steps += 1
        if self.steps - 1 == self.failing_step:
            raise ValueError("usage the account cannot take")
        return 1


class UtcTenants:
    async def time_zone(self, tenant_id: str) -> str:
        return "UTC"

    async def mailbox_connected(self, tenant_id: str) -> bool:
        return True  # e-mail leads can be written to


def recovery_with(meter: FailingMeter) -> tuple[Recovery, dict[bytes, Any], Scheduler]:
    table: dict[bytes, Any] = {}
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    gate = AiGate(cast(TenantStatusView, OpenView()), scheduler, cast(Any, {}),
                  cast(Any, {}))  # fmt: skip
    recovery = Recovery(
        table=cast(Any, table), qualification=cast(Any, {}), scheduler=scheduler,
        tenants=cast(Any, UtcTenants()), lead_events=cast(Any, Topic()),
        outbound_commands=cast(Any, Topic()), silence_ms=1_000,
        delays_s=(0, 3_600, 7_200, 10_800), local_hour=None, gate=gate, meter=cast(Any, meter),
    )  # fmt: skip
    return recovery, table, scheduler


async def fire_pending_recovery(acting: DeadlineActions, scheduler: Scheduler) -> None:
    await acting.act_on_or_dead_letter(
        fired("recovery", scheduler.pending(KEY)["recovery"]), Record()
    )


async def ends_after_a_silence(
    acting: DeadlineActions, scheduler: Scheduler, table: dict[bytes, Any]
) -> None:
    """After its last step the sequence waits one silence for a reply, then ends."""
    assert table[KEY]["step"] == len(STRATEGIES)
    assert scheduler.pending(KEY)["recovery"] == table[KEY]["last_sent_ms"] + 1_000
    await fire_pending_recovery(acting, scheduler)
    assert KEY not in table
    assert "recovery" not in scheduler.pending(KEY)


async def test_a_recovery_step_that_fails_is_skipped_and_the_sequence_goes_on() -> None:
    recovery, table, scheduler = recovery_with(FailingMeter(failing_step=1))
    acting, dead_letters = actions(scheduler, recovery.handlers(), recovery.dead_lettered())
    scheduler.set(KEY, {"silence": 1_000})
    await acting.act_on_or_dead_letter(fired("silence", 1_000), Record())
    started_ms = table[KEY]["started_ms"]

    await fire_pending_recovery(acting, scheduler)  # step 0 goes out
    await fire_pending_recovery(acting, scheduler)  # step 1 fails
    assert len(dead_letters.sent) == 1
    assert table[KEY]["step"] == 2
    # Step 2 is due at its own time, not at once.
    assert scheduler.pending(KEY)["recovery"] == started_ms + 7_200_000
    await fire_pending_recovery(acting, scheduler)
    await fire_pending_recovery(acting, scheduler)
    await ends_after_a_silence(acting, scheduler, table)
    assert len(dead_letters.sent) == 1


async def test_a_failing_last_step_ends_the_sequence() -> None:
    recovery, table, scheduler = recovery_with(FailingMeter(failing_step=len(STRATEGIES) - 1))
    acting, dead_letters = actions(scheduler, recovery.handlers(), recovery.dead_lettered())
    scheduler.set(KEY, {"silence": 1_000})
    await acting.act_on_or_dead_letter(fired("silence", 1_000), Record())
    for _ in STRATEGIES:
        await fire_pending_recovery(acting, scheduler)
    assert len(dead_letters.sent) == 1
    await ends_after_a_silence(acting, scheduler, table)


def gate_with(deferred: dict[bytes, Any]) -> tuple[AiGate, Scheduler]:
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    gate = AiGate(cast(TenantStatusView, OpenView()), scheduler, cast(Any, deferred),
                  cast(Any, {}))  # fmt: skip
    return gate, scheduler


def two_kinds_deferred() -> dict[bytes, Any]:
    return {KEY: {"tenant_id": TENANT, "actions": {
        "qualification": [{"text": "first"}, {"text": "second"}],
        "recovery": [{"step": 2}],
    }}}  # fmt: skip


async def test_a_resume_failing_while_postgres_is_unreachable_keeps_the_deferred_actions() -> None:
    # Before: the entry was removed before the resumers ran, and the deadlines agent's retry
    # (flexoraa.db.while_unreachable) found nothing deferred: the lead's answers were lost.
    deferred = two_kinds_deferred()
    gate, _ = gate_with(deferred)
    resumed: list[Any] = []
    outage = [ConnectionRefusedError("PostgreSQL is down")]

    async def answer(key: bytes, payloads: list[Any], session: Any) -> None:
        if outage:
            raise outage.pop()
        resumed.extend(payloads)

    async def recover(key: bytes, payloads: list[Any], session: Any) -> None:
        resumed.extend(payloads)

    gate.add_resumer("qualification", answer)
    gate.add_resumer("recovery", recover)
    resume = gate.handlers()[RESUME_DEADLINE]
    with pytest.raises(ConnectionRefusedError):
        await resume(KEY, fired(RESUME_DEADLINE, 1_000), SESSION)
    assert deferred == two_kinds_deferred()
    await resume(KEY, fired(RESUME_DEADLINE, 1_000), SESSION)  # the retry
    assert resumed == [{"text": "first"}, {"text": "second"}, {"step": 2}]
    assert KEY not in deferred


async def test_a_resume_failing_for_its_own_reason_drops_that_kind_and_keeps_the_others() -> None:
    deferred = two_kinds_deferred()
    gate, scheduler = gate_with(deferred)
    resumed: list[Any] = []

    async def answer(key: bytes, payloads: list[Any], session: Any) -> None:
        raise TypeError("an answer the interview cannot take")

    async def recover(key: bytes, payloads: list[Any], session: Any) -> None:
        resumed.extend(payloads)

    gate.add_resumer("qualification", answer)
    gate.add_resumer("recovery", recover)
    acting, dead_letters = actions(scheduler, gate.handlers(), gate.dead_lettered())
    scheduler.set(KEY, {RESUME_DEADLINE: 1_000})
    await acting.act_on_or_dead_letter(fired(RESUME_DEADLINE, 1_000), Record())

    [letter] = dead_letters.dead_letters()
    assert orjson.loads(raw_of(letter)) == {
        "tenant_id": TENANT,
        "actions": {"qualification": [{"text": "first"}, {"text": "second"}]},
    }
    assert deferred[KEY]["actions"] == {"recovery": [{"step": 2}]}
    # The rest resumes on the next tick, not at the next top-up.
    due_ms = scheduler.pending(KEY)[RESUME_DEADLINE]
    assert due_ms <= datetime.now(UTC).timestamp() * 1000
    await acting.act_on_or_dead_letter(fired(RESUME_DEADLINE, due_ms), Record())
    assert resumed == [{"step": 2}]
    assert KEY not in deferred
    assert len(dead_letters.sent) == 1


async def test_a_failing_hook_is_logged_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The state a hook meets may be what failed the deadline: raising there stopped the
    # worker at every restart.
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    scheduler.set(KEY, {"nudge": 1_000})

    async def failing(key: bytes, fired: DeadlineReached, session: Any) -> None:
        raise ValueError("the lead's state")

    def broken(key: bytes, fired: DeadlineReached) -> Any:
        raise KeyError("time_zone")

    kind = DeadLettered(settle=broken, evidence=broken)
    acting, dead_letters = actions(scheduler, {"nudge": failing}, {"nudge": kind})
    deadline = fired("nudge", 1_000)
    await acting.act_on_or_dead_letter(deadline, Record())
    [letter] = dead_letters.dead_letters()
    assert DeadlineReached.model_validate_json(raw_of(letter)) == deadline
    assert scheduler.pending(KEY) == {}
    assert [r.message for r in caplog.records if "dead-lettered deadline" in r.message] == [
        "evidence of dead-lettered deadline nudge failed",
        "settle of dead-lettered deadline nudge failed",
    ]


async def test_an_action_deferred_while_a_failed_resume_is_dead_lettered_is_kept() -> None:
    # The lead's lock is free between the failure and the dead letter's settling: an answer
    # deferred then, under the failing kind, was dropped with the failed ones.
    deferred = two_kinds_deferred()
    gate, scheduler = gate_with(deferred)

    async def answer(key: bytes, payloads: list[Any], session: Any) -> None:
        raise TypeError("an answer the interview cannot take")

    gate.add_resumer("qualification", answer)
    acting, dead_letters = actions(scheduler, gate.handlers(), gate.dead_lettered())
    scheduler.set(KEY, {RESUME_DEADLINE: 1_000})
    # What the interview agent does on the lead's next message, at the dead letter's await.
    poison = cast(Any, acting)._poison
    send_letter = poison.dead_letter

    async def deferring_meanwhile(*args: Any, **kwargs: Any) -> None:
        await send_letter(*args, **kwargs)
        gate.defer(KEY, TENANT, "qualification", {"text": "third"})

    poison.dead_letter = deferring_meanwhile
    await acting.act_on_or_dead_letter(fired(RESUME_DEADLINE, 1_000), Record())
    [letter] = dead_letters.dead_letters()
    assert orjson.loads(raw_of(letter))["actions"] == {
        "qualification": [{"text": "first"}, {"text": "second"}]
    }
    assert deferred[KEY]["actions"] == {
        "qualification": [{"text": "third"}], "recovery": [{"step": 2}],
    }  # fmt: skip


async def test_a_transient_failure_leaves_nothing_to_drop() -> None:
    deferred = two_kinds_deferred()
    gate, _ = gate_with(deferred)
    outage = [ConnectionRefusedError("PostgreSQL is down")]

    async def answer(key: bytes, payloads: list[Any], session: Any) -> None:
        if outage:
            raise outage.pop()

    gate.add_resumer("qualification", answer)
    gate.add_resumer("recovery", answer)
    with pytest.raises(ConnectionRefusedError):
        await gate.handlers()[RESUME_DEADLINE](KEY, fired(RESUME_DEADLINE, 1_000), SESSION)
    # Not a failure of the actions' own: a dead letter of the deadline would drop none.
    assert gate.dead_lettered()[RESUME_DEADLINE].evidence(KEY, fired(RESUME_DEADLINE, 1)) is None


async def test_a_recovery_step_failing_when_resumed_after_a_top_up_is_skipped() -> None:
    # A step deferred for want of tokens fails inside the gate's resume: the gate dropped it,
    # and the sequence stood at that step with no deadline, for good.
    meter = FailingMeter(failing_step=0)
    recovery, table, scheduler = recovery_with(meter)
    gate = cast(Any, recovery)._gate
    gate._view = PausedView()
    acting, dead_letters = actions(
        scheduler, recovery.handlers() | gate.handlers(),
        recovery.dead_lettered() | gate.dead_lettered(),
    )  # fmt: skip
    scheduler.set(KEY, {"silence": 1_000})
    await acting.act_on_or_dead_letter(fired("silence", 1_000), Record())
    await fire_pending_recovery(acting, scheduler)  # deferred: no tokens
    assert gate.has_deferred(KEY)
    gate._view = OpenView()
    resume_due = scheduler.pending(KEY)[RESUME_DEADLINE]
    await acting.act_on_or_dead_letter(fired(RESUME_DEADLINE, resume_due), Record())
    assert len(dead_letters.sent) == 1
    assert table[KEY]["step"] == 1
    assert "recovery" in scheduler.pending(KEY)


class PausedView(OpenView):
    def is_paused(self, tenant_id: str) -> bool:
        return True
