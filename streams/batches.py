"""Whole fetches of some topics, handed to their handlers past Faust's per-record path.

Faust delivers every record on its own: two tasks per record in the fetch loop (before
streams.eager), a queue per stream, an acknowledgement per record. On this machine that path
alone topped out at about 6,300 records/s for an agent that does nothing (a bare Faust app,
one `take_events` agent), well below the 20,000 usage events/s a worker must fold into the
token accounts; the account agent behind it did 1,968/s; and each inbound message went through
that path once for each of the five agents reading it. So the consumer takes the records of
the lane's topics (inbound messages, the token topics, the sent messages, the latency events,
and the topics only a PostgreSQL sink reads: delivery statuses, lead events) out of each fetch
and gives them to their handlers (the inbound agents, the leakage replies, the SLA windows,
the account fold, the sinks) a fetch at a time, and this module does for them what Faust did
for its streams:

- backpressure: a handler's queue holds a few fetches and the fetch loop waits while it is
  full (a lingering handler, see `BatchLane.add_handler`, also holds up to a batch of
  fetches it took out of its queue);
- acknowledgement: a fetch's offsets are acknowledged, and so committable, only once every
  handler is done with it (a crash before that reads it again; the handlers are idempotent).
  So a handler must not wait on an outside service: one slow handler holds every topic's
  commits and, once its queue is full, all fetching (the outbound agent, which waits on the
  channels, stays a Faust agent);
- rebalances: a fetch of an earlier consumer generation, or one dispatched while the flow is
  stopped, is dropped unacknowledged (the seek to the committed offset reads it again), and a
  revocation waits for the fetch a handler is working on, so no table is written for a
  partition that has moved.

Tables stay Faust's: the handlers write them with explicit partitions (or, handling a record
at a time, with the record as Faust's current event), and changelogs,
recovery and standbys are unchanged. The topics stay subscribed through the app's conductor,
so the assignment (co-partitioned with the lead topics' tables) is Faust's too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from faust.streams import _current_event
from faust.types import TP, AppT, TopicT

from schemas.events import REPLAY_FOR_HEADER

logger = logging.getLogger(__name__)

# The lane handler a task runs (None outside the lane): its dead letters name it, so that a
# replay goes to it alone (streams.dead_letters).
current_handler: ContextVar[str | None] = ContextVar("current_handler", default=None)


def replayed_for(record: Any) -> str | None:
    """The one handler a replayed record is for, or None (any record but a targeted replay)."""
    for name, value in getattr(record, "headers", None) or ():
        if name == REPLAY_FOR_HEADER:
            return bytes(value).decode()
    return None


class SourceRecord(Protocol):
    """A consumed record: Faust's `Message` and aiokafka's `ConsumerRecord` both are one."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> Any: ...
    @property
    def value(self) -> Any: ...


BatchHandler = Callable[[Sequence[SourceRecord]], Awaitable[None]]
# Records a one-at-a-time handler takes between two turns of the event loop.
RECORDS_PER_TURN = 50
RecordHandler = Callable[[SourceRecord], Awaitable[None]]
# Runs a record's handler, deciding what a failure does (streams.poison.PoisonRecords.handle).
RecordGuard = Callable[[RecordHandler, SourceRecord], Awaitable[None]]
RecordsByPartition = Mapping[TP, Sequence[Any]]


class FetchAcknowledger(Protocol):
    """The consumer side: which fetches are current, and acknowledging their offsets."""

    def is_current(self, generation: int | None) -> bool: ...
    def acknowledge_fetch(self, records: RecordsByPartition, generation: int) -> None: ...


@dataclass(eq=False, slots=True, weakref_slot=True)
class LaneEvent:
    """Faust's "current event" for a record handled on the lane: a table written while it is
    current puts the change in the record's partition, as from an agent."""

    message: SourceRecord


async def handle_as_current(handle: RecordHandler, record: SourceRecord) -> None:
    """`handle(record)` with the record as Faust's current event."""
    event = LaneEvent(record)
    # Faust keeps a weak reference to the event: `event` holds it until the record is done.
    token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    try:
        await handle(record)
    finally:
        _current_event.reset(token)


async def _unguarded(handle: RecordHandler, record: SourceRecord) -> None:
    await handle(record)


def one_record_at_a_time(handle: RecordHandler, guard: RecordGuard = _unguarded) -> BatchHandler:
    """A batch handler calling `handle` on each record in order, with the record as Faust's
    current event: an agent body, record by record, written as for a Faust agent (plain
    `table[key] = value` writes), without Faust's per-record delivery. `guard` runs each
    record's handling (and decides what its failure does)."""

    async def handle_current(record: SourceRecord) -> None:
        await handle_as_current(handle, record)

    async def handle_each(records: Sequence[SourceRecord]) -> None:
        for handled, record in enumerate(records):
            if handled and handled % RECORDS_PER_TURN == 0:
                # A handler rarely suspends (table writes are synchronous): a slice of a
                # backlog held the loop, and every request to the worker, for 200-250 ms.
                await asyncio.sleep(0)
            await guard(handle_current, record)

    return handle_each


@dataclass(eq=False)
class _Fetch:
    generation: int
    records: RecordsByPartition
    # Loop time of its dispatch: a lingering handler waits from here, not from when it got to
    # the fetch (a handler that fell behind does not add its whole window on top).
    dispatched_at: float
    unfinished_handlers: int = 0


@dataclass(eq=False)
class _Handler:
    name: str
    topics: frozenset[str]
    handle: BatchHandler
    # A fetch of a backlog can hold tens of thousands of records: a handler takes them in
    # slices of at most this many, so the other agents get the loop in between.
    max_batch: int
    # How long the handler waits after a fetch for more to write with it (see add_handler).
    linger_s: float = 0.0
    queue: asyncio.Queue[_Fetch] = field(default_factory=lambda: asyncio.Queue(maxsize=4))
    # The linger under way, which a revocation ends at once.
    lingering: asyncio.Timeout | None = None


class BatchLane:
    """The topics whose records go to batch handlers instead of Faust's streams."""

    def __init__(self, guard: RecordGuard = _unguarded) -> None:
        """`guard` runs each record of a record handler (`add_record_handler`)."""
        self._guard = guard
        self._handlers: list[_Handler] = []
        self._topics: dict[str, TopicT] = {}
        self.topics: frozenset[str] = frozenset()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._app: AppT | None = None

    def add_handler(
        self,
        name: str,
        topics: Iterable[TopicT],
        handle: BatchHandler,
        *,
        max_batch: int,
        linger_s: float = 0.0,
    ) -> None:
        """`handle` gets every record of `topics` (no Faust agent may read them).

        With `linger_s`, the handler takes the fetches dispatched within that time of the
        first (up to `max_batch` records) and handles them as one batch. A steady load comes
        in fetches of a few records each, and a handler with a fixed cost per call (a
        PostgreSQL transaction) paid it for every few records. The fetches taken wait in the
        handler, not in its queue, so the fetch loop never waits for the linger."""
        for topic in topics:
            self._topics[topic.get_topic_name()] = topic
        handler = _Handler(
            name, frozenset(t.get_topic_name() for t in topics), handle, max_batch, linger_s
        )
        self._handlers.append(handler)
        self.topics = frozenset(self._topics)

    def add_record_handler(
        self, name: str, topics: Iterable[TopicT], handle: RecordHandler, *, max_batch: int
    ) -> None:
        """`handle` gets every record of `topics` in order, one at a time, with the record as
        Faust's current event (see `one_record_at_a_time`), through the lane's guard."""
        self.add_handler(
            name, topics, one_record_at_a_time(handle, self._guard), max_batch=max_batch
        )

    def attach(self, app: AppT) -> None:
        """Subscribes the topics through the app and starts one task per handler. The app's
        consumer must be a `FetchAcknowledger` that dispatches to this lane."""
        self._app = app
        for topic in self._topics.values():
            app.topics.add(topic)
        for handler in self._handlers:
            app.task(self._runner(app, handler))

    def _runner(self, app: AppT, handler: _Handler) -> Callable[[], Awaitable[None]]:
        async def run_batch_handler() -> None:
            try:
                await self._run(handler)
            except asyncio.CancelledError:
                raise
            # A handler that raises stops the worker, as a crashing agent does (the app's
            # CrashingSupervisor): its fetch stays unacknowledged and is read again.
            except Exception as exc:
                logger.exception("batch handler %s failed; stopping the worker", handler.name)
                await app.crash(exc)

        run_batch_handler.__qualname__ = f"batch-{handler.name}"
        return run_batch_handler

    def split(self, records: RecordsByPartition) -> tuple[dict[TP, Any], dict[TP, Any]]:
        """(the records for the lane, the rest for Faust's streams)."""
        mine: dict[TP, Any] = {}
        rest: dict[TP, Any] = {}
        for tp, batch in records.items():
            (mine if tp.topic in self.topics else rest)[tp] = batch
        return mine, rest

    async def dispatch(self, records: RecordsByPartition, generation: int) -> None:
        """Queues a fetch's records for each handler of their topics (waits while full)."""
        self._warn_unserved_replays(records)
        fetch = _Fetch(generation, records, asyncio.get_running_loop().time())
        targets = [h for h in self._handlers if any(tp.topic in h.topics for tp in records)]
        fetch.unfinished_handlers = len(targets)
        for handler in targets:
            await handler.queue.put(fetch)

    def _warn_unserved_replays(self, records: RecordsByPartition) -> None:
        """A replay for a handler this worker does not run (switched off, renamed) is taken by
        none: said (a line per topic and handler in a fetch), not skipped without a trace."""
        unserved: Counter[tuple[str, str]] = Counter()
        for tp, batch in records.items():
            for record in batch:
                if not getattr(record, "headers", None):
                    continue
                target = replayed_for(record)
                if target is not None and not any(
                    h.name == target and tp.topic in h.topics for h in self._handlers
                ):
                    unserved[(tp.topic, target)] += 1
        for (topic, target), count in unserved.items():
            logger.warning(
                "%d replayed records of %s are for %r, which does not read that topic here: "
                "no handler takes them", count, topic, target,
            )  # fmt: skip

    async def quiesce(self) -> None:
        """For a revocation (the flow is already stopped): drops the queued fetches, ends the
        lingers (what they hold is stale now, and dropped) and waits for the fetches being
        handled."""
        now = asyncio.get_running_loop().time()
        for handler in self._handlers:
            while not handler.queue.empty():
                handler.queue.get_nowait()
            if handler.lingering is not None:
                handler.lingering.reschedule(now)
        await self._idle.wait()

    def _consumer(self) -> FetchAcknowledger | None:
        # Faust creates its consumer lazily, after the composition root ran.
        return None if self._app is None else cast(FetchAcknowledger, self._app.consumer)

    def _is_current(self, fetch: _Fetch) -> bool:
        consumer = self._consumer()
        return consumer is not None and consumer.is_current(fetch.generation)

    async def _run(self, handler: _Handler) -> None:
        current_handler.set(handler.name)  # this task's own context
        while True:
            fetches = [await handler.queue.get()]
            # Busy from the first fetch taken: a revocation waits for those lingering too.
            self._busy += 1
            self._idle.clear()
            try:
                if handler.linger_s:
                    await self._linger(handler, fetches)
                # Checked after the linger: a rebalance meanwhile makes them stale.
                fetches = [fetch for fetch in fetches if self._is_current(fetch)]
                records = [
                    record
                    for fetch in fetches
                    for tp, batch in fetch.records.items()
                    if tp.topic in handler.topics
                    for record in batch
                    # A replay for another handler: this one took the record the first time.
                    if not getattr(record, "headers", None)
                    or replayed_for(record) in (None, handler.name)
                ]
                for start in range(0, len(records), handler.max_batch):
                    await handler.handle(records[start : start + handler.max_batch])
                    await asyncio.sleep(0)  # the other agents' turn (see max_batch)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()
            consumer = self._consumer()
            for fetch in fetches:
                fetch.unfinished_handlers -= 1
                if fetch.unfinished_handlers == 0 and consumer is not None:
                    consumer.acknowledge_fetch(fetch.records, fetch.generation)

    @staticmethod
    async def _linger(handler: _Handler, fetches: list[_Fetch]) -> None:
        """Adds to `fetches` those dispatched within `linger_s` of the first, up to
        `max_batch` records."""

        def records_of(fetch: _Fetch) -> int:
            return sum(len(b) for tp, b in fetch.records.items() if tp.topic in handler.topics)

        taken = records_of(fetches[0])
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(
                    fetches[0].dispatched_at + handler.linger_s
                ) as handler.lingering:
                    while taken < handler.max_batch:
                        fetch = await handler.queue.get()
                        fetches.append(fetch)
                        taken += records_of(fetch)
        finally:
            handler.lingering = None
