"""Cold recovery starts after the lead's silence since its latest message, not an older one
read late (a Meta retry, a Gmail backfill, a message still queued when the deadline fired)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

from schemas.events import InboundMessage
from schemas.messaging import DeadlineReached
from tests.unit.test_dead_lettered_deadlines import (
    KEY,
    LEAD,
    TENANT,
    FailingMeter,
    recovery_with,
)

SILENCE_MS = 1_000  # recovery_with's


def message(at: datetime) -> InboundMessage:
    return InboundMessage(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=at,
                          lead_id=LEAD, channel="whatsapp", contact="+919800000002",
                          text="Hi", received_at=at)  # fmt: skip


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def reached(deadline: str, due_ms: int) -> DeadlineReached:
    """The lead's `deadline`, due at `due_ms`, fired now."""
    now = datetime.now(UTC)
    return DeadlineReached(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                           lead_id=LEAD, deadline=deadline, due_ms=due_ms,
                           fired_at=now)  # fmt: skip


async def test_a_message_read_late_does_not_end_the_silence_early() -> None:
    recovery, _, scheduler = recovery_with(FailingMeter(failing_step=-1))
    latest = datetime.now(UTC)
    await recovery.on_customer_message(message(latest))
    await recovery.on_customer_message(message(latest - timedelta(days=2)))
    assert scheduler.pending(KEY)["silence"] == ms(latest) + SILENCE_MS


async def test_silence_fired_while_the_lead_had_written_since_waits_for_the_latest() -> None:
    recovery, table, scheduler = recovery_with(FailingMeter(failing_step=-1))
    now_ms = int(time.time() * 1000)
    session = {"tenant_id": TENANT, "last_customer_message_ms": now_ms}
    fired = reached("silence", now_ms - 5_000)
    await recovery.handlers()["silence"](KEY, fired, session)
    assert table == {}  # no recovery started
    assert scheduler.pending(KEY) == {"silence": now_ms + SILENCE_MS}


async def test_a_step_resumed_after_a_top_up_outside_its_local_hour_waits_for_it() -> None:
    recovery, table, scheduler = recovery_with(FailingMeter(failing_step=-1))
    now_ms = int(time.time() * 1000)
    hour = (datetime.now(UTC) + timedelta(hours=3)).hour  # not the hour running now
    recovery._local_hour = hour
    table[KEY] = {"step": 0, "started_ms": now_ms, "last_sent_ms": now_ms, "time_zone": "UTC"}
    step = reached("recovery", now_ms)
    await recovery._resume(KEY, [step.model_dump(mode="json")], {"tenant_id": TENANT})
    assert table[KEY]["step"] == 0  # not sent
    due = datetime.fromtimestamp(scheduler.pending(KEY)["recovery"] / 1000, tz=UTC)
    assert (due.hour, due.minute) == (hour, 0)
    assert due > datetime.now(UTC)


async def test_a_lead_no_message_can_reach_ends_its_sequence_uncharged() -> None:
    # Silence (a day by default) outlasts Instagram's and Messenger's 24-hour window: every
    # step was charged for a message the outbound agent could only report failed.
    meter = FailingMeter(failing_step=-1)
    recovery, table, scheduler = recovery_with(meter)
    now_ms = int(time.time() * 1000)
    table[KEY] = {"step": 0, "started_ms": now_ms, "last_sent_ms": now_ms, "time_zone": "UTC"}
    scheduler.set(KEY, {"recovery": now_ms})
    session = {"tenant_id": TENANT, "channel": "instagram",
               "last_customer_message_ms": now_ms - 2 * 86_400_000}  # fmt: skip
    fired = reached("recovery", now_ms)
    await recovery.handlers()["recovery"](KEY, fired, session)
    assert meter.steps == 0
    assert table == {}
    # E-mail has no window: the same step goes out.
    table[KEY] = {"step": 0, "started_ms": now_ms, "last_sent_ms": now_ms, "time_zone": "UTC"}
    await recovery.handlers()["recovery"](KEY, fired, {**session, "channel": "email"})
    assert meter.steps == 1
    assert table[KEY]["step"] == 1


async def test_a_message_before_any_step_went_out_is_no_recovery_success() -> None:
    recovery, table, scheduler = recovery_with(FailingMeter(failing_step=-1))
    now = datetime.now(UTC)
    table[KEY] = {"step": 0, "started_ms": ms(now), "last_sent_ms": ms(now), "time_zone": "UTC"}
    scheduler.set(KEY, {"recovery": ms(now) + 60_000})
    await recovery.on_customer_message(message(now + timedelta(seconds=1)))
    assert table == {}
    assert scheduler.pending(KEY) == {"silence": ms(now + timedelta(seconds=1)) + SILENCE_MS}
    assert recovery._lead_events.sent == []  # type: ignore[attr-defined]


async def test_a_message_written_before_the_sequence_started_but_read_after_ends_it() -> None:
    # Compared with the start, a mail written just before the silence fired and polled after
    # it counted as old: the sequence went on to a lead who had just written.
    recovery, table, scheduler = recovery_with(FailingMeter(failing_step=-1))
    now = datetime.now(UTC)
    silent_since = now - timedelta(days=1)
    session = {
        "tenant_id": TENANT,
        "channel": "email",
        "last_customer_message_ms": ms(silent_since),
    }
    fired = reached("silence", ms(now))
    await recovery.handlers()["silence"](KEY, fired, session)
    assert table[KEY]["step"] == 0  # started
    await recovery.on_customer_message(message(now - timedelta(seconds=20)))
    assert table == {}
    assert "recovery" not in scheduler.pending(KEY)
    # The lead's last message read again (a Meta retry) does not end a sequence.
    await recovery.handlers()["silence"](KEY, fired, session)
    await recovery.on_customer_message(message(silent_since))
    assert table[KEY]["step"] == 0


async def test_a_reply_names_the_attempt_it_answered() -> None:
    # Marked by lead and step, a reply also marked that step of every earlier sequence as
    # answered, and the recovery statistics counted replies that never came.
    recovery, table, _ = recovery_with(FailingMeter(failing_step=-1))
    now = datetime.now(UTC)
    table[KEY] = {"step": 0, "started_ms": ms(now), "last_sent_ms": ms(now), "time_zone": "UTC",
                  "silent_since_ms": ms(now - timedelta(days=1))}  # fmt: skip
    session = {"tenant_id": TENANT, "channel": "email", "last_customer_message_ms": 0}
    fired = reached("recovery", ms(now))
    await recovery.handlers()["recovery"](KEY, fired, session)
    await recovery.on_customer_message(message(datetime.now(UTC) + timedelta(seconds=1)))
    sent = recovery._lead_events.sent  # type: ignore[attr-defined]
    events = [json.loads(value) for _, value in sent]
    (attempt,) = [e for e in events if e["type"] == "recovery_attempt"]
    (replied,) = [e for e in events if e["type"] == "recovery_replied"]
    assert replied["data"]["attempt_event_id"] == attempt["event_id"]


async def test_a_step_fired_late_past_its_local_hour_waits_for_the_next() -> None:
    # Overdue steps fire on the first tick after a restart: a worker down overnight sent the
    # 10:00 steps at 03:00.
    meter = FailingMeter(failing_step=-1)
    recovery, table, scheduler = recovery_with(meter)
    now_ms = int(time.time() * 1000)
    hour = (datetime.now(UTC) + timedelta(hours=3)).hour  # not the hour running now
    recovery._local_hour = hour
    table[KEY] = {"step": 1, "started_ms": now_ms, "last_sent_ms": now_ms, "time_zone": "UTC"}
    fired = reached("recovery", now_ms - 6 * 3_600_000)
    session = {"tenant_id": TENANT, "channel": "email", "last_customer_message_ms": 0}
    await recovery.handlers()["recovery"](KEY, fired, session)
    assert (meter.steps, table[KEY]["step"]) == (0, 1)  # not sent
    due = datetime.fromtimestamp(scheduler.pending(KEY)["recovery"] / 1000, tz=UTC)
    assert (due.hour, due.minute) == (hour, 0)
