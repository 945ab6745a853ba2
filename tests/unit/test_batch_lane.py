"""The batch lane: a fetch is acknowledged once every handler of its topics is done with it,
never when it belongs to an earlier consumer generation, and a revocation waits for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import faust
import pytest
from faust.streams import current_event
from faust.types import TP, AppT, TopicT

from schemas.events import REPLAY_FOR_HEADER
from streams.batches import (
    RECORDS_PER_TURN,
    BatchLane,
    RecordsByPartition,
    SourceRecord,
    current_handler,
    one_record_at_a_time,
)

USAGE = "acme.token-usage"
CREDITS = "acme.token-credits"
MAX = 100


@dataclass(frozen=True)
class FakeTopic:
    name: str

    def get_topic_name(self) -> str:
        return self.name


def topics(*names: str) -> list[TopicT]:
    return [cast(TopicT, FakeTopic(name)) for name in names]


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes = b"tenant"
    value: bytes = b"{}"
    headers: tuple[tuple[str, bytes], ...] = ()


def fetch_of(topic: str, partition: int, offsets: range) -> dict[TP, list[Record]]:
    return {TP(topic, partition): [Record(topic, partition, o) for o in offsets]}


@dataclass
class FakeConsumer:
    generation: int = 1
    flowing: bool = True
    acknowledged: list[tuple[TP, int]] = field(default_factory=list)

    def is_current(self, generation: int | None) -> bool:
        return self.flowing and generation == self.generation

    def acknowledge_fetch(self, records: RecordsByPartition, generation: int) -> None:
        if self.is_current(generation):
            self.acknowledged += [(tp, r.offset) for tp, batch in records.items() for r in batch]


@dataclass
class FakeSubscriptions:
    added: list[Any] = field(default_factory=list)

    def add(self, topic: Any) -> None:
        self.added.append(topic)


@dataclass
class FakeApp:
    consumer: FakeConsumer = field(default_factory=FakeConsumer)
    topics: FakeSubscriptions = field(default_factory=FakeSubscriptions)
    tasks: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    crashed: list[BaseException] = field(default_factory=list)

    def task(self, fun: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.tasks.append(fun)

    async def crash(self, exc: BaseException) -> None:
        self.crashed.append(exc)


class Recorder:
    """A handler that records its batches; `gate` holds it until set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, records: Sequence[SourceRecord]) -> None:
        self.started.set()
        await self.gate.wait()
        self.batches.append([r.offset for r in records])


async def running(lane: BatchLane, app: FakeApp) -> list[asyncio.Task[None]]:
    lane.attach(cast(AppT, app))
    return [asyncio.create_task(run()) for run in app.tasks]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_fetch_is_acknowledged_after_every_handler_of_its_topics() -> None:
    app, lane = FakeApp(), BatchLane()
    accounts, ledger = Recorder(), Recorder()
    lane.add_handler("accounts", topics(USAGE, CREDITS), accounts, max_batch=MAX)
    lane.add_handler("ledger", topics(USAGE), ledger, max_batch=MAX)
    tasks = await running(lane, app)
    ledger.gate.clear()
    await lane.dispatch(fetch_of(USAGE, 3, range(5, 8)), generation=1)
    await settle()
    assert accounts.batches == [[5, 6, 7]]
    assert app.consumer.acknowledged == []  # the ledger is still writing
    ledger.gate.set()
    await settle()
    assert ledger.batches == [[5, 6, 7]]
    assert app.consumer.acknowledged == [(TP(USAGE, 3), 5), (TP(USAGE, 3), 6), (TP(USAGE, 3), 7)]
    # A credit goes to the accounts only, and is acknowledged by it alone.
    await lane.dispatch(fetch_of(CREDITS, 0, range(2)), generation=1)
    await settle()
    assert accounts.batches[-1] == [0, 1]
    assert ledger.batches == [[5, 6, 7]]
    assert app.consumer.acknowledged[-2:] == [(TP(CREDITS, 0), 0), (TP(CREDITS, 0), 1)]
    for task in tasks:
        task.cancel()


async def test_a_fetch_of_an_earlier_generation_is_neither_handled_nor_acknowledged() -> None:
    app, lane = FakeApp(), BatchLane()
    accounts = Recorder()
    lane.add_handler("accounts", topics(USAGE), accounts, max_batch=MAX)
    tasks = await running(lane, app)
    app.consumer.generation = 2  # a rebalance happened after the fetch
    await lane.dispatch(fetch_of(USAGE, 1, range(3)), generation=1)
    await settle()
    assert accounts.batches == []
    assert app.consumer.acknowledged == []
    for task in tasks:
        task.cancel()


async def test_a_revocation_drops_queued_fetches_and_waits_for_the_one_being_handled() -> None:
    app, lane = FakeApp(), BatchLane()
    accounts = Recorder()
    accounts.gate.clear()
    lane.add_handler("accounts", topics(USAGE), accounts, max_batch=MAX)
    tasks = await running(lane, app)
    await lane.dispatch(fetch_of(USAGE, 1, range(3)), generation=1)
    await accounts.started.wait()
    await lane.dispatch(fetch_of(USAGE, 1, range(3, 6)), generation=1)  # queued behind it
    app.consumer.flowing = False  # Faust stops the flow, then waits for the consumer
    quiesced = asyncio.create_task(lane.quiesce())
    await settle()
    assert not quiesced.done()
    accounts.gate.set()
    await asyncio.wait_for(quiesced, 1)
    await settle()
    # The handled fetch finished after the flow stopped: not acknowledged (read again by the
    # partition's next owner, which skips what the account already holds); the queued one
    # never reached the handler.
    assert accounts.batches == [[0, 1, 2]]
    assert app.consumer.acknowledged == []
    for task in tasks:
        task.cancel()


async def test_a_large_fetch_is_handled_in_slices() -> None:
    app, lane = FakeApp(), BatchLane()
    accounts = Recorder()
    lane.add_handler("accounts", topics(USAGE), accounts, max_batch=4)
    tasks = await running(lane, app)
    await lane.dispatch(fetch_of(USAGE, 0, range(10)), generation=1)
    await settle()
    assert accounts.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(app.consumer.acknowledged) == 10
    for task in tasks:
        task.cancel()


@asynccontextmanager
async def lingering_ledger(
    linger_s: float, max_batch: int = MAX
) -> AsyncIterator[tuple[FakeApp, BatchLane, Recorder]]:
    app, lane, ledger = FakeApp(), BatchLane(), Recorder()
    lane.add_handler("ledger", topics(USAGE), ledger, max_batch=max_batch, linger_s=linger_s)
    tasks = await running(lane, app)
    try:
        yield app, lane, ledger
    finally:
        for task in tasks:
            task.cancel()


async def test_a_lingering_handler_takes_the_fetches_that_arrive_meanwhile_as_one_batch() -> None:
    async with lingering_ledger(linger_s=0.2) as (app, lane, ledger):
        # More fetches than the handler's queue holds: the fetch loop must not wait for the
        # linger.
        for first in range(0, 12, 2):
            await asyncio.wait_for(
                lane.dispatch(fetch_of(USAGE, 0, range(first, first + 2)), generation=1), 0.1
            )
        await settle()
        assert ledger.batches == []  # still lingering
        assert app.consumer.acknowledged == []
        await asyncio.sleep(0.25)
        assert ledger.batches == [list(range(12))]
        assert [offset for _, offset in app.consumer.acknowledged] == list(range(12))


async def test_a_lingering_handler_stops_waiting_once_it_has_a_full_batch() -> None:
    async with lingering_ledger(linger_s=60, max_batch=4) as (app, lane, ledger):
        await lane.dispatch(fetch_of(USAGE, 0, range(3)), generation=1)
        await lane.dispatch(fetch_of(USAGE, 1, range(3)), generation=1)
        await settle()
        # Six records in slices of four, without waiting out the minute.
        assert ledger.batches == [[0, 1, 2, 0], [1, 2]]
        assert len(app.consumer.acknowledged) == 6


async def test_fetches_a_rebalance_made_stale_during_the_linger_are_dropped() -> None:
    async with lingering_ledger(linger_s=0.05) as (app, lane, ledger):
        await lane.dispatch(fetch_of(USAGE, 0, range(3)), generation=1)
        await settle()
        app.consumer.generation = 2
        await lane.dispatch(fetch_of(USAGE, 5, range(3)), generation=2)
        await asyncio.sleep(0.1)
        assert ledger.batches == [[0, 1, 2]]  # only the new generation's fetch
        assert app.consumer.acknowledged == [(TP(USAGE, 5), o) for o in range(3)]


async def test_a_revocation_ends_a_linger_at_once_and_drops_what_it_held() -> None:
    async with lingering_ledger(linger_s=60) as (app, lane, ledger):
        await lane.dispatch(fetch_of(USAGE, 0, range(3)), generation=1)
        await settle()
        app.consumer.flowing = False  # Faust stops the flow, then waits for the consumer
        # Not the minute's linger: a rebalance or a shutdown must not wait it out.
        await asyncio.wait_for(lane.quiesce(), 1)
        # Stale once the flow stopped: dropped, not written, not acknowledged (read again).
        assert ledger.batches == []
        assert app.consumer.acknowledged == []


async def test_a_handler_that_fell_behind_lingers_from_the_fetch_s_dispatch() -> None:
    async with lingering_ledger(linger_s=0.1) as (app, lane, ledger):
        ledger.gate.clear()  # a slow write
        await lane.dispatch(fetch_of(USAGE, 0, range(2)), generation=1)
        await asyncio.sleep(0.15)  # the first linger ran out; the write is under way
        await lane.dispatch(fetch_of(USAGE, 0, range(2, 4)), generation=1)
        await asyncio.sleep(0.15)  # dispatched 0.15 s ago when the handler gets to it
        ledger.gate.set()
        await settle()
        # Its window had passed: written at once, not 0.1 s later.
        assert ledger.batches == [[0, 1], [2, 3]]
        assert len(app.consumer.acknowledged) == 4


async def test_another_task_runs_between_the_slices_of_a_handler_that_never_suspends() -> None:
    app, lane = FakeApp(), BatchLane()
    handled: list[int] = []

    async def table_writes(records: Sequence[SourceRecord]) -> None:
        handled.extend(r.offset for r in records)  # no await inside, as a table write

    lane.add_handler("accounts", topics(USAGE), table_writes, max_batch=4)
    tasks = await running(lane, app)
    seen_by_another_task: list[int] = []

    async def another_task() -> None:
        while True:
            seen_by_another_task.append(len(handled))
            await asyncio.sleep(0)

    other = asyncio.create_task(another_task())
    await lane.dispatch(fetch_of(USAGE, 0, range(10)), generation=1)
    await settle()
    other.cancel()

    assert handled == list(range(10))
    assert {4, 8} <= set(seen_by_another_task)  # the loop was handed over after each slice
    for task in tasks:
        task.cancel()


async def test_a_failing_handler_stops_the_worker_without_acknowledging() -> None:
    app, lane = FakeApp(), BatchLane()

    async def broken(records: Sequence[SourceRecord]) -> None:
        raise RuntimeError("database schema missing")

    lane.add_handler("accounts", topics(USAGE), broken, max_batch=MAX)
    tasks = await running(lane, app)
    await lane.dispatch(fetch_of(USAGE, 0, range(2)), generation=1)
    await settle()
    assert [str(e) for e in app.crashed] == ["database schema missing"]
    assert app.consumer.acknowledged == []
    for task in tasks:
        task.cancel()


async def test_records_handled_one_at_a_time_write_tables_in_their_own_partition() -> None:
    # A Faust table puts a change in the partition of the current event; a record handled on
    # the lane stands as that event, so the inbound agents' writes land in its partition.
    app = faust.App("lane-test", autodiscover=False)
    table = app.Table("sessions", key_type=bytes, partitions=8)
    written: list[tuple[int, int | None]] = []

    async def handle(record: SourceRecord) -> None:
        written.append((record.offset, table.partition_for_key(record.key)))

    await one_record_at_a_time(handle)(
        [Record(USAGE, 3, 10), Record(USAGE, 5, 11), Record(USAGE, 3, 12)]
    )

    assert written == [(10, 3), (11, 5), (12, 3)]
    assert current_event() is None  # nothing left behind once the batch is done


async def test_records_handled_one_at_a_time_let_other_tasks_run_between_turns() -> None:
    handled: list[int] = []

    async def handle(record: SourceRecord) -> None:
        handled.append(record.offset)  # never suspends, as a table write

    seen_by_another_task: list[int] = []

    async def another_task() -> None:
        while True:
            seen_by_another_task.append(len(handled))
            await asyncio.sleep(0)

    other = asyncio.create_task(another_task())
    await asyncio.sleep(0)
    records = [Record(USAGE, 0, offset) for offset in range(4 * RECORDS_PER_TURN)]
    await one_record_at_a_time(handle)(records)
    other.cancel()

    assert handled == list(range(4 * RECORDS_PER_TURN))
    turns = sorted({n for n in seen_by_another_task if 0 < n < len(records)})
    assert turns == [RECORDS_PER_TURN, 2 * RECORDS_PER_TURN, 3 * RECORDS_PER_TURN]


async def test_a_replayed_record_goes_to_the_handler_it_is_for_and_is_acknowledged() -> None:
    # The topic's other handlers took it the first time: a second run would repeat their
    # effects (a leak reported again, a recovery restarted).
    app, lane = FakeApp(), BatchLane()
    accounts, ledger = Recorder(), Recorder()
    lane.add_handler("accounts", topics(USAGE), accounts, max_batch=MAX)
    lane.add_handler("ledger", topics(USAGE), ledger, max_batch=MAX)
    tasks = await running(lane, app)
    for_ledger = ((REPLAY_FOR_HEADER, b"ledger"), ("traceparent", b"00-ab"))
    await lane.dispatch({TP(USAGE, 1): [
        Record(USAGE, 1, 40), Record(USAGE, 1, 41, headers=for_ledger),
        Record(USAGE, 1, 42, headers=(("traceparent", b"00-cd"),)),
    ]}, generation=1)  # fmt: skip
    await settle()
    assert accounts.batches == [[40, 42]]
    assert ledger.batches == [[40, 41, 42]]
    assert [offset for _, offset in app.consumer.acknowledged] == [40, 41, 42]
    for task in tasks:
        task.cancel()


async def test_dead_letters_of_a_lane_handler_name_it() -> None:
    app, lane = FakeApp(), BatchLane()
    named: list[str | None] = []

    async def handle(records: Sequence[SourceRecord]) -> None:
        named.append(current_handler.get())

    lane.add_handler("sink-lead-events", topics(USAGE), handle, max_batch=MAX)
    tasks = await running(lane, app)
    await lane.dispatch(fetch_of(USAGE, 0, range(1)), generation=1)
    await settle()
    assert named == ["sink-lead-events"]
    assert current_handler.get() is None  # not outside the lane's tasks
    for task in tasks:
        task.cancel()


async def test_a_replay_for_a_handler_not_reading_the_topic_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Switched off or renamed since the letter was written: no handler takes the record.
    app, lane = FakeApp(), BatchLane()
    accounts = Recorder()
    lane.add_handler("accounts", topics(USAGE), accounts, max_batch=MAX)
    lane.add_handler("ledger", topics(CREDITS), Recorder(), max_batch=MAX)
    tasks = await running(lane, app)
    await lane.dispatch({TP(USAGE, 1): [
        Record(USAGE, 1, 7, headers=((REPLAY_FOR_HEADER, b"ledger"),)),
        Record(USAGE, 1, 8, headers=((REPLAY_FOR_HEADER, b"accounts"),)),
    ]}, generation=1)  # fmt: skip
    await settle()
    assert accounts.batches == [[8]]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"1 replayed records of {USAGE} are for 'ledger', which does not read that topic here: "
        "no handler takes them"
    ]
    for task in tasks:
        task.cancel()
