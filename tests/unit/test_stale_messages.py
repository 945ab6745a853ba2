"""A customer message read days after it was written (a mailbox's week of mail imported when it
is connected, a channel's retries after a long outage) is recorded but not acted on: no AI
interview question, no wait for a rep, no recovery silence. Acted on, connecting a mailbox
leaked every sender of the last week at once, sent each an interview question and started
recovery for the COLD ones."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from connectors.ai import QualificationAI
from flexoraa.settings import Settings
from schemas.events import InboundMessage
from streams.agents.qualification import Interviewer, QualificationTopics
from streams.rules.qualification import Policy
from streams.rules.session import read_too_late
from tests.unit import test_leakage_waits as leakage
from tests.unit.test_assignment_effects import Gate, Meter, Router, Tenants, Topic
from tests.unit.test_dead_lettered_deadlines import KEY, LEAD, TENANT, FailingMeter, recovery_with

DAY_MS = 86_400_000


def message(age: timedelta) -> InboundMessage:
    now = datetime.now(UTC)
    return InboundMessage(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now - age,
                          lead_id=LEAD, channel="email", contact="gus@example.com",
                          text="How much for 10 seats?", received_at=now)  # fmt: skip


def test_a_message_is_stale_only_past_the_setting() -> None:
    assert read_too_late(0, DAY_MS + 1, DAY_MS)
    assert not read_too_late(0, DAY_MS, DAY_MS)
    assert not read_too_late(0, 30 * DAY_MS, 0)  # 0: never


async def test_no_interview_question_answers_a_days_old_message() -> None:
    commands = Topic()
    topics = QualificationTopics(
        lead_events=cast(Any, Topic()), outbound_commands=cast(Any, commands),
        notifications=cast(Any, Topic()), latency=cast(Any, Topic()),
    )  # fmt: skip
    interviewer = Interviewer(
        QualificationAI(Settings(openai_api_key=None)), cast(Any, Router(True)),
        Policy(budget_threshold=10_000, budget_currency="USD", escalation_days=30),
        cast(Any, Tenants()), topics, cast(Any, Gate()), cast(Any, Meter()),
        stale_after_ms=DAY_MS,
    )  # fmt: skip
    assert await interviewer.handle(message(timedelta(days=3)), None) is None
    assert commands.sent == []
    assert await interviewer.handle(message(timedelta(minutes=1)), None) is not None
    assert len(commands.sent) == 1  # a fresh one is interviewed


async def test_no_leak_wait_starts_for_a_days_old_message() -> None:
    lane, table, scheduler, _ = leakage.waits(stale_after_ms=DAY_MS)
    stale = message(timedelta(days=3))
    await lane.handlers["leakage-waits"](leakage.Record(stale.model_dump_json().encode(), key=KEY))
    assert (table, scheduler.pending(KEY)) == ({}, {})
    fresh = message(timedelta(minutes=1))
    await lane.handlers["leakage-waits"](leakage.Record(fresh.model_dump_json().encode(), key=KEY))
    assert list(scheduler.pending(KEY)) == ["leak"]


async def test_no_recovery_silence_is_counted_from_a_days_old_message() -> None:
    recovery, _, scheduler = recovery_with(FailingMeter(failing_step=-1))
    recovery._stale_after_ms = DAY_MS
    await recovery.on_customer_message(message(timedelta(days=3)))
    assert scheduler.pending(KEY) == {}
    await recovery.on_customer_message(message(timedelta(minutes=1)))
    assert list(scheduler.pending(KEY)) == ["silence"]
