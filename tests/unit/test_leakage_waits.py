"""A lead's wait starts at its first unanswered message and ends at a reply to it, whichever
order the two topics' handlers (each with a queue of its own) read them in."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from schemas.events import InboundMessage
from schemas.messaging import OutboundMessage
from streams.agents import leakage as leakage_agent
from streams.batches import SourceRecord
from streams.timers import DeadlineIndex, Scheduler
from tests.fakes.topics import RecordingTopic

LEAD = str(uuid.uuid4())
KEY = LEAD.encode()
TENANT = str(uuid.uuid4())
# Recent: a wait moves earlier only before its leak is due.
AT = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)


@dataclass(frozen=True)
class Record:
    value: bytes
    topic: str = "acme.x"
    partition: int = 0
    offset: int = 0
    key: bytes = KEY


@dataclass
class Lane:
    handlers: dict[str, Callable[[SourceRecord], Awaitable[None]]] = field(default_factory=dict)

    def add_record_handler(self, name: str, topics: Any, handle: Any, *, max_batch: int) -> None:
        self.handlers[name] = handle


class Tenants:
    async def leak_threshold_s(self, tenant_id: str) -> int:
        return 1800


def waits(
    stale_after_ms: int = 0,
    *,
    tenants: Any = None,
    table: dict[bytes, Any] | None = None,
    scheduler: Scheduler | None = None,
) -> tuple[Lane, dict[bytes, Any], Scheduler, RecordingTopic]:
    """The two handlers on a lane of their own; another lane's over the same `table` and
    `scheduler` when given (a handler with other tenant settings, racing the first)."""
    lane, events = Lane(), RecordingTopic()
    table = {} if table is None else table
    scheduler = scheduler or Scheduler(cast(Any, {}), DeadlineIndex())
    leakage_agent.register(
        cast(Any, lane), inbound=cast(Any, None), outbound_messages=cast(Any, None),
        lead_events=cast(Any, events), leakage=cast(Any, table), scheduler=scheduler,
        tenants=cast(Any, tenants or Tenants()), max_batch=100, stale_after_ms=stale_after_ms,
    )  # fmt: skip
    return lane, table, scheduler, events


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def inbound(at: datetime) -> Record:
    message = InboundMessage(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=at,
                             lead_id=LEAD, channel="whatsapp", contact="+919800000001",
                             text="Price?", received_at=at)  # fmt: skip
    return Record(message.model_dump_json().encode())


def reply(at: datetime) -> Record:
    sent = OutboundMessage(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=at,
                           lead_id=LEAD, command_id=str(uuid.uuid4()), attempt=1,
                           channel="whatsapp", send_kind="freeform", status="accepted",
                           text="Hello!", sent_by="ai")  # fmt: skip
    return Record(sent.model_dump_json().encode())


async def test_an_answer_read_before_its_message_starts_no_wait() -> None:
    lane, table, scheduler, _ = waits()
    await lane.handlers["leakage-replies"](reply(AT + timedelta(seconds=2)))
    await lane.handlers["leakage-waits"](inbound(AT))
    assert scheduler.pending(KEY) == {}
    # The lead's next message, after the answer, is waited on.
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
    assert list(scheduler.pending(KEY)) == ["leak"]
    assert table[KEY]["waiting_since_ms"] == int((AT + timedelta(minutes=5)).timestamp() * 1000)


async def test_a_reply_sent_before_the_message_waited_on_does_not_end_the_wait() -> None:
    lane, _, scheduler, events = waits()
    await lane.handlers["leakage-waits"](inbound(AT))
    await lane.handlers["leakage-replies"](reply(AT - timedelta(minutes=1)))
    assert list(scheduler.pending(KEY)) == ["leak"]
    assert events.sent == []
    await lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=1)))
    assert scheduler.pending(KEY) == {}
    assert len(events.sent) == 1  # the first reply, once


async def test_a_message_under_another_leads_key_starts_no_wait() -> None:
    # Set aside by the sessions handler; a wait for it, on a partition not the lead's, was
    # re-queued by a worker without the lead's session every tick.
    lane, table, scheduler, _ = waits()
    wrong = inbound(AT)
    await lane.handlers["leakage-waits"](Record(wrong.value, key=str(uuid.uuid4()).encode()))
    assert table == {}
    assert scheduler.pending(KEY) == {}


async def test_an_answer_recorded_while_the_threshold_is_looked_up_is_not_overwritten() -> None:
    # The wait was decided on the table read before the lookup's await: the answer recorded
    # meanwhile by the replies' handler was overwritten by a new wait, a false leak later.
    lane, table, scheduler, _ = waits()
    answered = asyncio.Event()
    looked_up = asyncio.Event()

    class SlowTenants:
        async def leak_threshold_s(self, tenant_id: str) -> int:
            looked_up.set()
            await answered.wait()  # a cache miss: PostgreSQL asked
            return 1800

    slow_lane, *_ = waits(tenants=SlowTenants(), table=table, scheduler=scheduler)
    waiting = asyncio.ensure_future(slow_lane.handlers["leakage-waits"](inbound(AT)))
    await looked_up.wait()
    await lane.handlers["leakage-replies"](reply(AT + timedelta(seconds=30)))
    answered.set()
    await waiting
    assert scheduler.pending(KEY) == {}
    assert table[KEY] == int((AT + timedelta(seconds=30)).timestamp() * 1000)


async def test_a_message_that_starts_no_wait_asks_nothing_of_postgres() -> None:
    # Asked for every message, each held the lane while PostgreSQL was down (the cache
    # expired): a lead already waiting, or answered, needs no threshold.
    lane, table, scheduler, _ = waits()

    class Unreachable:
        async def leak_threshold_s(self, tenant_id: str) -> int:
            raise AssertionError("asked although no wait starts")

    quiet, *_ = waits(tenants=Unreachable(), table=table, scheduler=scheduler)
    await lane.handlers["leakage-waits"](inbound(AT))  # waiting
    await quiet.handlers["leakage-waits"](inbound(AT + timedelta(minutes=1)))
    table[KEY] = int((AT + timedelta(minutes=5)).timestamp() * 1000)  # answered at :05
    await quiet.handlers["leakage-waits"](inbound(AT + timedelta(minutes=2)))


async def test_an_earlier_message_read_late_moves_the_wait_to_it() -> None:
    # A channel delivered the lead's two messages out of order: left at the later one, the
    # leak fired late by the gap, and the lead counted as not having written again.
    lane, table, scheduler, _ = waits()
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
    await lane.handlers["leakage-waits"](inbound(AT))
    assert table[KEY]["waiting_since_ms"] == ms(AT)
    assert scheduler.pending(KEY) == {"leak": ms(AT + timedelta(seconds=1800))}


async def test_an_earlier_message_answered_by_a_reply_read_before_it_does_not_move_it() -> None:
    # Written at :00, answered at :02, the lead wrote again at :05; read :05, the reply, :00.
    lane, table, scheduler, _ = waits()
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
    await lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=2)))
    await lane.handlers["leakage-waits"](inbound(AT))
    assert table[KEY]["waiting_since_ms"] == ms(AT + timedelta(minutes=5))
    # So too when the reply was read first of all (the entry was its time).
    lane, table, scheduler, _ = waits()
    await lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=2)))
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
    await lane.handlers["leakage-waits"](inbound(AT))
    assert table[KEY]["waiting_since_ms"] == ms(AT + timedelta(minutes=5))
    assert scheduler.pending(KEY) == {"leak": ms(AT + timedelta(minutes=5, seconds=1800))}


async def test_a_reply_read_after_the_leads_next_message_leaves_that_one_waited_on() -> None:
    # :00 answered at :02, the lead wrote again at :05, and that was read before the reply
    # (after an outage, the two topics' backlogs): the reply ended the wait for good, and the
    # message at :05 never leaked.
    lane, table, scheduler, events = waits()
    await lane.handlers["leakage-waits"](inbound(AT))
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
    await lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=2)))
    assert [json.loads(e)["type"] for e in events.sent] == ["first_reply"]  # :00 answered
    assert table[KEY]["waiting_since_ms"] == ms(AT + timedelta(minutes=5))
    assert scheduler.pending(KEY) == {"leak": ms(AT + timedelta(minutes=5, seconds=1800))}
    # A message between the reply and that one, read last, is the wait's start.
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=3)))
    assert table[KEY]["waiting_since_ms"] == ms(AT + timedelta(minutes=3))
    # One before the reply is not.
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=1)))
    assert table[KEY]["waiting_since_ms"] == ms(AT + timedelta(minutes=3))
    await lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=6)))
    assert scheduler.pending(KEY) == {}
    assert table[KEY] == ms(AT + timedelta(minutes=6))


async def test_a_reply_between_messages_read_late_leaves_the_earliest_after_it_waited_on() -> None:
    # :00, :03 and :05 read, then the reply at :02: :03 is the earliest unanswered message,
    # whatever order the three were read in.
    for order in ([0, 3, 5], [3, 0, 5], [5, 3, 0], [0, 5, 3]):
        lane, table, scheduler, _ = waits()
        for minute in order:
            await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=minute)))
        await lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=2)))
        assert table[KEY]["waiting_since_ms"] == ms(AT + timedelta(minutes=3)), order
        assert scheduler.pending(KEY) == {"leak": ms(AT + timedelta(minutes=3, seconds=1800))}


async def test_one_reply_is_one_first_reply_event_whatever_wait_it_ended() -> None:
    # Read before or after an earlier message that moves the wait, the reply's event is one.
    ids = set()
    answer = reply(AT + timedelta(minutes=7))
    for reply_first in (True, False):
        lane, _, _, events = waits()
        await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
        if reply_first:
            await lane.handlers["leakage-replies"](answer)
        await lane.handlers["leakage-waits"](inbound(AT))
        if not reply_first:
            await lane.handlers["leakage-replies"](answer)
        ids |= {json.loads(e)["event_id"] for e in events.sent}
    assert len(ids) == 1


async def test_a_message_read_again_sets_a_lost_deadline_move_right() -> None:
    # A worker killed between the wait's move and its deadline's: the deadline was left at
    # the later message's due (the leak late by the gap).
    lane, _, scheduler, _ = waits()
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
    await lane.handlers["leakage-waits"](inbound(AT))
    scheduler.set(KEY, {"leak": ms(AT + timedelta(minutes=5, seconds=1800))})  # the lost move
    await lane.handlers["leakage-waits"](inbound(AT))
    assert scheduler.pending(KEY) == {"leak": ms(AT + timedelta(seconds=1800))}


class Thresholds:
    """The tenant's threshold, changed by the test; a lookup can be held (a cache miss)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.held: asyncio.Event | None = None
        self.asked = asyncio.Event()

    async def leak_threshold_s(self, tenant_id: str) -> int:
        self.asked.set()
        if self.held is not None:
            await self.held.wait()
        return self.seconds


async def test_a_follow_up_wait_takes_the_tenants_threshold_as_it_is_then() -> None:
    # :00 waited on with 30 minutes; by the reply at :02 (read after the lead's :05) the
    # tenant has 10: the wait for :05 is a new one, due at :15, not :35.
    tenants = Thresholds(1800)
    lane, table, scheduler, _ = waits(tenants=tenants)
    await lane.handlers["leakage-waits"](inbound(AT))
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
    tenants.seconds = 600
    await lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=2)))
    assert table[KEY]["waiting_since_ms"] == ms(AT + timedelta(minutes=5))
    assert scheduler.pending(KEY) == {"leak": ms(AT + timedelta(minutes=15))}
    assert table[KEY]["due_ms"] == ms(AT + timedelta(minutes=15))


async def test_a_reply_ends_its_wait_before_a_slow_threshold_lookup_returns() -> None:
    # The lookup waits for PostgreSQL on a cache miss (and while it is down): the answered
    # wait must not stay due meanwhile, and a wait changed meanwhile is not retimed.
    tenants = Thresholds(1800)
    lane, table, scheduler, events = waits(tenants=tenants)
    await lane.handlers["leakage-waits"](inbound(AT))
    await lane.handlers["leakage-waits"](inbound(AT + timedelta(minutes=5)))
    tenants.seconds, tenants.held = 600, asyncio.Event()
    tenants.asked.clear()  # asked for the wait :00 started
    replying = asyncio.ensure_future(
        lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=2)))
    )
    await asyncio.wait_for(tenants.asked.wait(), timeout=5)
    # Applied already: :00 answered (its first reply sent), :05 waited on.
    assert [json.loads(e)["type"] for e in events.sent] == ["first_reply"]
    assert table[KEY]["waiting_since_ms"] == ms(AT + timedelta(minutes=5))
    # Answered too before the lookup returns: nothing brings the wait back.
    await lane.handlers["leakage-replies"](reply(AT + timedelta(minutes=6)))
    tenants.held.set()
    await replying
    assert table[KEY] == ms(AT + timedelta(minutes=6))
    assert scheduler.pending(KEY) == {}
