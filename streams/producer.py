"""The worker's producer and consumer: nothing marked handled before its effects exist.

The producer: table changes reach their changelogs only after the effects sent before them.

An agent sends its effects (usage billed, a question to the lead, lead events) and then changes
its table, which also marks the input as handled. Kafka orders nothing across partitions: with
Faust's producer the changelog record could be acknowledged while an effect sent just before it
was not, and a worker killed in between came back with a table saying "handled" for a message
whose usage row or question never arrived (found by the kill -9 fault test). So a changelog
write is held until every record sent before it is acknowledged; the in-memory table changes
at once (readers see it), only its changelog record waits.

Held writes go out in rounds: one producer flush, then every write held until then. Within a
round only a key's last value is sent (a changelog is compacted: recovery keeps the last value
per key anyway), which turns a busy tenant's hundred account updates into one record. They are
published from the round's task, not through Faust's producer buffer: the conductor stops
reading input whenever that buffer holds over 100 records, and a round of a few hundred writes
stalled every input stream ("producer buffer full" several times a second in the token bench).
A table of the worker (`HeldChangelogTable`) holds its writes as serialised records and the
round hands them straight to aiokafka (see there); Faust's FutureMessages are held only where
its own path is kept (transactions).

`flush` (which Faust calls before committing offsets and before a rebalance's table recovery)
releases the held writes and waits for every one of them: Faust's own flush gives up on its
buffer after 0.1 s without progress, and offsets were committed ahead of queued writes.

The consumer: an offset is committed only past messages every stream acknowledged, and a
rebalance reads again from the committed offset, or from the beginning where nothing was
committed yet. Faust commits from the lowest acknowledged offset when it is just past the
committed one (or when nothing was committed), and aiokafka does not seek a partition without
a committed offset; so a record one stream had not taken before a rebalance emptied its queue
was skipped for good (found twice: an inbound message missing from both its session and
PostgreSQL in the kill -9 test, and 342 of 10,000 interview steps in the throughput bench).

Two more ways a rebalance skipped records, both found by a worker started on a backlog:
- Faust's streams skip a message of an earlier consumer generation (or one read while the flow
  is stopped) and acknowledge it all the same; that acknowledgement let the commit pass a
  record no agent handled. Such acknowledgements are not counted here.
- Faust drops a record below the partition's last read offset. A record fetched before the
  rebalance's seek finishes its delivery after the seek and moves that mark past the records
  the seek reads again, which were dropped ("DROPPED MESSAGE ROFF"). A source record is never
  dropped here (every agent recognises a duplicate by its event id); the mark is still kept
  for Faust's gap detection, which it only needs moving forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.protocol.commit import OffsetCommitRequest
from faust.exceptions import ProducerSendError
from faust.stores.memory import Store as MemoryStore
from faust.streams import current_event
from faust.tables import TableManager
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AiokafkaConsumer
from faust.transport.drivers.aiokafka import Producer as AiokafkaProducer
from faust.types import TP, CodecArg, ConsumerT, Message, ProducerT, StoreT, TableT
from faust.types.tuples import FutureMessage, RecordMetadata, ack_lock
from mode import Seconds, Service
from mode.services import WaitArgT, WaitResults
from mode.utils.futures import maybe_async, notify

from flexoraa.kafka import back_off_failed_metadata_updates, drain_whole_nodes
from streams.batches import BatchLane
from streams.eager import STEP_IN_PLACE, Delivery, first_step, marking_deliveries
from streams.metrics import FETCH_MIN_BYTES, FETCHED_PARTITIONS, PRODUCER_BLOCKED
from streams.monitor import LeanPrometheusMonitor
from streams.pacing import FetchPacer, record_bytes
from streams.replay import ReplayingRecovery

logger = logging.getLogger(__name__)
# The coordinator's generation of a consumer it no longer counts a member.
_NO_GENERATION = OffsetCommitRequest.DEFAULT_GENERATION_ID

# Held writes published between two turns of the event loop (about 10 ms of work).
RELEASE_SLICE = 500
# A send longer than this waited for the producer (flexoraa_producer_blocked_seconds); below
# it, a garbage collection or the OS running another process is as likely.
SEND_WAIT_COUNTED_S = 0.005
# The most a paced fetch asks the broker for: a fetch's own limit (`fetch_max_bytes`) is 50 MiB,
# but past a megabyte a backlog's fetches are full anyway and the minimum only adds waiting.
FETCH_MIN_BYTES_CAP = 1024 * 1024


# A weak reference lets a test see a round let go of each write as it goes.
@dataclass(eq=False, slots=True, weakref_slot=True)
class HeldWrite:
    """A changelog record, serialised, waiting for the effects sent before it."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    # Where the table keeps the offsets of its changelog (a RocksDB store; memory keeps none).
    store: StoreT[Any, Any] | None = None


def _write_key(write: HeldWrite | FutureMessage) -> Hashable:
    """The changelog entry a write replaces: (topic, partition, key)."""
    if isinstance(write, HeldWrite):
        return (write.topic, write.partition, write.key)
    message = write.message
    return (message.channel.get_topic_name(), message.partition, message.key)


class EffectsFirstProducer(AiokafkaProducer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: dict[Hashable, HeldWrite | FutureMessage] = {}
        self._something_held = asyncio.Event()
        self._releasing = asyncio.Lock()

    def _new_producer(self, transactional_id: str | None = None) -> AIOKafkaProducer:
        producer = super()._new_producer(transactional_id)
        back_off_failed_metadata_updates(producer.client)
        drain_whole_nodes(producer)
        return producer

    def send_soon(self, fut: FutureMessage) -> None:
        # Faust sends table changelog records (and only those) through send_soon.
        self.hold(fut)

    def hold(self, write: HeldWrite | FutureMessage) -> None:
        key = _write_key(write)
        # Re-inserted, not updated in place: the round publishes in the order of last writes.
        self._held.pop(key, None)
        self._held[key] = write
        self._something_held.set()

    async def release_held(self) -> None:
        """Publishes the held changelog writes once everything produced before them is
        acknowledged; rounds run one at a time, so a key's later value is never overtaken.

        A round that fails or is cancelled holds its unpublished writes again, ahead of any
        written meanwhile, so the next round publishes them: a changelog write is never dropped.
        """
        async with self._releasing:
            held, self._held = self._held, {}
            self._something_held.clear()
            if not held:
                return
            # Taken off one by one: the round must not keep every message it published alive
            # until it ends. Let go of, each is freed once Kafka acknowledges it; kept, a
            # backlog's round (266,831 writes in the reads benchmark) freed them all at once
            # when it ended, which held the loop for 115-150 ms.
            to_publish = deque(held.values())
            held.clear()
            in_flight: HeldWrite | FutureMessage | None = None
            try:
                if self._producer is not None:
                    await self._producer.flush()
                published = 0
                while to_publish:
                    in_flight = to_publish.popleft()
                    if isinstance(in_flight, HeldWrite):
                        await self._send_held(in_flight)
                    else:
                        await in_flight.message.channel.publish_message(in_flight, wait=False)
                    in_flight = None
                    published += 1
                    if published % RELEASE_SLICE == 0:
                        # publish_message rarely yields: such a round held the loop, requests
                        # and all, for seconds.
                        await asyncio.sleep(0)
            except BaseException:
                if in_flight is not None:
                    to_publish.appendleft(in_flight)
                self._hold_again(to_publish)
                raise

    async def _send_held(self, write: HeldWrite) -> None:
        monitor = lean_monitor(self.transport.app)
        delivered = await produce(
            self._ensure_producer(), monitor, write.topic, write.key, write.value, write.partition
        )
        if write.store is None:
            delivered.add_done_callback(partial(report_undelivered, write.topic, monitor))
        else:
            delivered.add_done_callback(partial(changelog_delivered, write, monitor))

    def _hold_again(self, unpublished: Iterable[HeldWrite | FutureMessage]) -> None:
        """Puts a failed round's writes back before the newer ones: a key written since keeps
        its newer value, and the round order stays the order of last writes."""
        newer, self._held = self._held, {}
        for write in unpublished:
            key = _write_key(write)
            if key not in newer:
                self._held[key] = write
        self._held.update(newer)
        if self._held:
            self._something_held.set()

    @Service.task
    async def _release_held_writes(self) -> None:
        while not self.should_stop:
            await self._something_held.wait()
            await self.release_held()

    async def flush(self) -> None:
        await self.release_held()
        while self.buffer.size:
            await self.buffer.flush()
        await super().flush()


class DirectTopic(faust.Topic):
    """A topic whose effects go straight to aiokafka's producer.

    The worker's effects (usage, lead events, questions, notifications) are bytes it already
    serialised. Faust's send wraps each in a FutureMessage and a PendingMessage, runs its codecs
    and sensors and chains a callback onto aiokafka's future: about 10 % of the worker's CPU
    for the same produce call (bench.throughput --credited, 3 alternating runs: 1.23-1.27
    against 1.38-1.40 ms per event). Nothing is weaker for it: the effects-first rule rests
    on `release_held` and `flush` flushing the aiokafka producer, which covers these records
    as it covered Faust's.

    Faust's path is kept wherever it adds something: sends attached to the current event
    (`stream_publish_on_commit`), transactions (exactly_once), anything but bytes, and any
    option beyond key and value.
    """

    async def send(
        self, *, key: Any = None, value: Any = None, **options: Any
    ) -> Awaitable[RecordMetadata]:
        app = self.app
        kafka = cast(EffectsFirstProducer, app.producer)._producer
        if (
            options
            or kafka is None
            or not isinstance(value, bytes)
            or not (key is None or isinstance(key, bytes))
            or app.in_transaction
            or (app.conf.stream_publish_on_commit and current_event() is not None)
        ):
            return await super().send(key=key, value=value, **options)
        topic = self.get_topic_name()
        monitor = lean_monitor(app)
        delivered = await produce(kafka, monitor, topic, key, value)
        delivered.add_done_callback(partial(report_undelivered, topic, monitor))
        return delivered


def lean_monitor(app: faust.types.AppT) -> LeanPrometheusMonitor | None:
    """The app's monitor, where it is the worker's (which counts records sent past Faust)."""
    monitor = app.monitor
    return monitor if isinstance(monitor, LeanPrometheusMonitor) else None


async def produce(
    kafka: AIOKafkaProducer,
    monitor: LeanPrometheusMonitor | None,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    partition: int | None = None,
) -> asyncio.Future[RecordMetadata]:
    """Hands one serialised record to aiokafka; returns its delivery future. The record counts
    as sent once aiokafka took it, and as a send error if it refused it."""
    started = time.perf_counter()
    try:
        delivered: asyncio.Future[RecordMetadata] = await kafka.send(
            topic, value, key=key, partition=partition
        )
    except KafkaError as exc:
        if monitor is not None:
            monitor.count_send_error()
        # The exception callers of Faust's send see.
        raise ProducerSendError(f"Error while sending: {exc!r}") from exc
    finally:
        # A send returns without suspending (tens of microseconds) unless its partition's batch
        # is full or its topic's metadata unknown; one that gave up waited too.
        if (waited := time.perf_counter() - started) > SEND_WAIT_COUNTED_S:
            PRODUCER_BLOCKED.inc(waited)
    if monitor is not None:
        monitor.count_sent(topic)
    return delivered


class HeldChangelogTable(faust.Table[Any, Any]):
    """A table whose changelog writes wait in the producer as records, not FutureMessages.

    A table write went through Faust's `send_soon` (a FutureMessage and a PendingMessage,
    eager partitioning), was held, and was then published through Faust's `publish_message`
    (sensors, the producer wrapper, two chained callbacks): per inbound event a dozen writes,
    about a fifth of the worker's CPU in the throughput profile. Here a write is serialised
    as Faust would serialise it and held as a `HeldWrite`, which the release round hands
    straight to aiokafka; the effects-first rule and the round's compaction are unchanged.

    Faust's path is kept for transactions (exactly_once sends through its transaction
    manager) and for a write with no partition yet or whose serialiser adds headers.
    """

    def on_key_set(self, key: Any, value: Any) -> None:
        partition = self.write_changelog(self.partition_for_key(key), key, value)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    def on_key_del(self, key: Any) -> None:
        partition = self.write_changelog(
            self.partition_for_key(key), key, None, value_serializer="raw"
        )
        self._maybe_del_key_ttl(key, partition)
        self._sensor_on_del(self, key)

    def write_changelog(
        self,
        partition: int | None,
        key: Any,
        value: Any,
        *,
        value_serializer: CodecArg | None = None,
    ) -> int:
        """Sends `key`'s new value (None: deleted) to the changelog, held until the effects
        sent before it are acknowledged; returns the partition written."""
        producer = self.app.producer
        if (
            partition is not None
            and not self.app.in_transaction
            and isinstance(producer, EffectsFirstProducer)
        ):
            changelog = cast(faust.Topic, self.changelog_topic)
            # Fresh dicts, as Faust's send passes: a schema may add headers to them in place.
            record_key, key_headers = changelog.prepare_key(key, self.key_serializer, headers={})
            record_value, value_headers = changelog.prepare_value(
                value, value_serializer or self.value_serializer, headers={}
            )
            if not key_headers and not value_headers:
                store = self.data
                producer.hold(
                    HeldWrite(
                        changelog.get_topic_name(),
                        partition,
                        record_key,
                        record_value,
                        None if isinstance(store, MemoryStore) else store,
                    )
                )
                return partition
        fut = self.send_changelog(partition, key, value, value_serializer=value_serializer)
        return cast(int, fut.message.partition)


def changelog_delivered(
    write: HeldWrite, monitor: LeanPrometheusMonitor | None, delivered: asyncio.Future[Any]
) -> None:
    """A changelog record's delivery callback where the store keeps offsets (what Faust's
    `Collection._on_changelog_sent` does outside transactions)."""
    report_undelivered(write.topic, monitor, delivered)
    if write.store is not None and not delivered.cancelled() and delivered.exception() is None:
        offset = cast(RecordMetadata, delivered.result()).offset
        write.store.set_persisted_offset(TP(write.topic, write.partition), offset)


def report_undelivered(
    topic: str, monitor: LeanPrometheusMonitor | None, delivered: asyncio.Future[Any]
) -> None:
    """A record's delivery callback (effects, and changelogs of a memory store): a failure is
    logged and counted."""
    if delivered.cancelled() or delivered.exception() is None:
        return
    logger.warning("record to %s not delivered: %r", topic, delivered.exception())
    if monitor is not None:
        monitor.count_send_error()


class ReadOffsets(dict[TP, int | None]):
    """Faust's last-read offset per partition, which never drops a source record read again.

    Faust's fetch loop reads the mark of a record's partition, drops the record if it lies
    below, reports a gap if it lies more than one above, and moves the mark to it once
    delivered. Here the mark hides itself from a source record below it, so the record is
    delivered and the mark moves back to it; changelog records keep Faust's rule (recovery
    must not apply a stale value fetched before its seek)."""

    def __init__(self, is_source: Callable[[str], bool]) -> None:
        super().__init__()
        self._is_source = is_source
        # The record the fetch loop is deciding about: the mark is read just after it is
        # yielded, with no await in between.
        self.being_read: Message | None = None

    def __missing__(self, tp: TP) -> None:
        return None

    def __getitem__(self, tp: TP) -> int | None:
        mark = super().__getitem__(tp)
        record = self.being_read
        if (
            mark is not None
            and record is not None
            and record.offset < mark
            and record.tp == tp
            and self._is_source(tp.topic)
        ):
            return None
        return mark


class BoundedFetchWaitThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, its fetches held by the broker at most the app's
    `fetch_max_wait_s` (Faust fixes 1.5 s).

    aiokafka keeps one fetch in flight per broker, and a fetch leaves out the partitions whose
    records the worker has not taken yet. Once those are taken they wait for the fetch in
    flight to return, and when the partitions it asked for are quiet the broker holds it for
    the whole wait. In bench.freshness at 700 messages/s (3 alternating runs each) p99 was
    1.1-1.7 s with 25 ms against 3.2-4.8 s with 1.5 s; an idle worker pays for it with more
    empty fetches (0.058 of a core against 0.018).

    Each fetch also asks for a minimum of bytes that follows the worker's recent reading
    (`streams.pacing`): a busy worker's fetches no longer come back with a record or two each.
    """

    _pacer: FetchPacer | None = None

    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            # aiokafka reads it when the consumer starts; a rename must not pass silently.
            raise RuntimeError("aiokafka's consumer no longer has _fetch_max_wait_ms")
        app = cast(WorkerApp, self.app)
        consumer._fetch_max_wait_ms = max(1, round(app.fetch_max_wait_s * 1000))
        back_off_failed_metadata_updates(consumer._client)
        self._pacer = (
            FetchPacer(app.fetch_pacing_s, FETCH_MIN_BYTES_CAP) if app.fetch_pacing_s else None
        )
        FETCH_MIN_BYTES.set(1)  # aiokafka's default, until the pacer's first window ends
        return consumer

    async def _fetch_records(
        self,
        consumer: AIOKafkaConsumer,
        active_partitions: set[TP],
        timeout: float | None = None,  # noqa: ASYNC109 (Faust's signature)
        max_records: int | None = None,
    ) -> Any:
        records = await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )
        pacer = self._pacer
        if pacer is not None:
            # Counted empty too: a worker gone quiet must come back to small fetches.
            paced = pacer.read(record_bytes(records) if records else 0, time.monotonic())
            if paced is not None:
                fetcher = consumer._fetcher
                if not hasattr(fetcher, "_fetch_min_bytes"):
                    # aiokafka builds each fetch request from it: a rename must not pass
                    # silently (the worker would spin on small fetches again).
                    raise RuntimeError("aiokafka's fetcher no longer has _fetch_min_bytes")
                # aiokafka sends one fetch per broker, each asking the minimum of its own
                # partitions: a share of the whole each, or with three brokers every fetch
                # would wait three intervals' worth.
                brokers = max(1, len(consumer._client.cluster.brokers()))
                min_bytes = max(1, paced // brokers)
                fetcher._fetch_min_bytes = min_bytes
                FETCH_MIN_BYTES.set(min_bytes)
        return records

    def verify_event_path(self, now: float, tp: TP) -> None:
        """Faust's check that each assigned partition is being fetched, less the paused ones.

        A table's changelog partition is paused once its recovery is done
        (`AcknowledgedOnlyConsumer.pause_partitions`), so aiokafka never fetches it again, by
        design. Faust's check logged each such partition as stuck ("Aiokafka has not sent
        fetch request ... since start") at every round once a worker had run five minutes:
        648 error lines in the first minute after that in bench.leakage.
        """
        consumer = self._consumer
        if consumer is not None and tp in consumer.paused():
            return None
        return super().verify_event_path(now, tp)


class MainLoopConsumerThread(BoundedFetchWaitThread):
    """Faust's consumer "thread", served on the worker's own event loop instead of a thread.

    Faust runs aiokafka's consumer in a thread with a loop of its own and hands every call
    (each fetch, commit, seek) across with a method queue: a wake-up of each loop per call,
    and the two threads taking turns at the GIL. Profiled at 500 messages/s that thread was
    a quarter of the worker's samples, half of them its loop's own machinery. Here the calls
    are awaited where they are made; aiokafka runs its fetches and heartbeats as tasks of
    the main loop, as it does in any asyncio program.
    """

    def __init__(self, consumer: Any, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(consumer, loop=loop, thread_loop=loop, **kwargs)

    async def start(self) -> None:
        # A plain service start: no thread, and no method queue to start on it.
        self._thread_started.set()
        await self._default_start()

    async def stop(self) -> None:
        if self._started.is_set() and not self._stopped.is_set():
            self._stopped.set()
            # What the thread ran on its way out (the aiokafka consumer stopped first), but
            # not its sweep of every task left on its loop, which is the worker's loop here.
            # Bounded as the wait for the thread was: aiokafka's stop waits for a rebalance in
            # progress, and that for the agents' records.
            try:
                await asyncio.wait_for(self._shutdown_thread(), self.shutdown_timeout)
            except TimeoutError:
                logger.warning(
                    "the Kafka consumer did not stop within %.0f s; stopping without it",
                    self.shutdown_timeout,
                )

    async def on_thread_stop(self) -> None:
        consumer = self._consumer
        if consumer is not None and consumer._closed and consumer._fetcher is not None:
            # Faust's close() (a rebalance while the worker stops) marks the consumer closed
            # without stopping its fetcher, and aiokafka's stop() then does nothing: its fetch
            # task went on until the worker's last sweep (the thread's loop used to end it).
            await consumer._fetcher.close()
        await super().on_thread_stop()

    async def call_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await maybe_async(fun(*args, **kwargs))

    async def cast_thread(self, fun: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        await maybe_async(fun(*args, **kwargs))

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        await self.consumer.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        await self.consumer.on_partitions_assigned(assigned, generation_id)


class AcknowledgedOnlyConsumer(AiokafkaConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Where reading starts in a source partition nothing was committed for yet.
        self._start_offsets: dict[TP, int] = {}
        self._read_offset = self._read_marks = ReadOffsets(self.app.topics.acks_enabled_for)
        # Delivered at once when nothing waits (streams.eager, `wait_first`).
        self.callback = marking_deliveries(self.callback)

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return MainLoopConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def _batch_lane(self) -> BatchLane | None:
        return cast(WorkerApp, self.app).batch_lane

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:  # noqa: ASYNC109 (Faust's signature)
        """A fetch, less the records of changelogs under recovery, which are applied to their
        tables here, and of the batch lane's topics, which go to the lane."""
        records = await super()._getmany(active_partitions, timeout)
        # Taken once the fetch is back, as Faust's loop takes it: aiokafka drops what a fetch
        # brings back from a position a rebalance's seek has moved since.
        generation = self.app.consumer_generation_id
        recovery = cast(TableManager, self.app.tables).recovery
        # Any other table manager (an app built without ours) recovers through Faust's path.
        if records and self.is_current(generation) and isinstance(recovery, ReplayingRecovery):
            replay, records = recovery.split(records)
            if replay:
                self._track_end_offsets(replay)
                await recovery.replay(
                    replay, self._to_message, still_current=partial(self.is_current, generation)
                )
        lane = self._batch_lane
        if lane is None or not records:
            return records
        for_lane, for_streams = lane.split(records)
        if for_lane:
            generation = self.app.consumer_generation_id
            # Dropped when the flow stopped meanwhile: Faust seeks back to the committed
            # offsets then (and at every assignment), so they are read again.
            if self.flow_active and self.is_current(generation):
                assigned = self.assignment()
                dispatched = {tp: batch for tp, batch in for_lane.items() if tp in assigned}
                self._track_lane_fetch(dispatched)
                await lane.dispatch(dispatched, generation)
        return for_streams

    def _track_lane_fetch(self, records: Mapping[TP, Sequence[Any]]) -> None:
        """What Faust's own fetch loop records for its streams' records, the lane's once a
        fetch: end offsets (the consumer-lag panel; the inbound topic was missing from it)
        and received counts."""
        self._track_end_offsets(records)
        lean = lean_monitor(self.app)
        if lean is not None:
            for tp, batch in records.items():
                lean.count_received(tp.topic, len(batch))
                lean.stream_taken(tp)

    def _track_end_offsets(self, records: Mapping[TP, Sequence[Any]]) -> None:
        monitor = self.app.monitor
        for tp in records:
            # Known for a partition whose records just came in; the gauge refuses None.
            if (highwater := self.highwater(tp)) is not None:
                monitor.track_tp_end_offset(tp, highwater)

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        """Also stops aiokafka fetching them.

        Faust pauses a partition only by not asking for its records any more; aiokafka went
        on fetching it. After recovery every changelog partition is paused that way, so the
        first write to each came back in a fetch nobody drained: aiokafka then sends the
        broker no fetch for its `prefetch_backoff` (100 ms), which held every input topic,
        and kept those records buffered for good (up to 1 MiB a partition). In the freshness
        bench at 20 messages/s this was the p99: about 110 ms."""
        paused = set(tps)
        super().pause_partitions(paused)
        self._set_fetching(paused, fetching=False)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        resumed = set(tps)
        super().resume_partitions(resumed)
        self._set_fetching(resumed, fetching=True)

    def _set_fetching(self, tps: set[TP], *, fetching: bool) -> None:
        thread = self._thread
        consumer = thread._consumer
        if consumer is None or thread.thread_loop.is_closed():
            return
        # Scheduled, not called: a pause creates a future on the consumer's loop, and the calls
        # run in the order made, after the rebalance that assigned them.
        thread.thread_loop.call_soon_threadsafe(
            _apply_in_aiokafka, consumer, tps, fetching, frozenset(self.app.tables.changelog_topics)
        )

    def still_a_member(self) -> bool:
        """Whether the group still counts this worker a member: a worker the coordinator has
        dropped (a missed heartbeat) is told to revoke partitions that are already another
        worker's, and must not write their tables then."""
        consumer = self._thread._consumer
        coordinator = getattr(consumer, "_coordinator", None)
        return coordinator is None or coordinator.generation != _NO_GENERATION

    def is_current(self, generation: int | None) -> bool:
        """Whether a record of this consumer generation may be handled and acknowledged now."""
        app = self.app
        return generation == app.consumer_generation_id and app.flow_control.is_active()

    def acknowledge_fetch(self, records: Mapping[TP, Sequence[Any]], generation: int) -> None:
        """Acknowledges a batch lane fetch every handler is done with (Faust's `ack`, for
        records that never became messages)."""
        if not self.is_current(generation):
            return
        with ack_lock:
            for tp, batch in records.items():
                committed = self._committed_offset[tp]
                acked_index = self._acked_index[tp]
                acked = self._acked[tp]
                for record in batch:
                    offset = record.offset
                    if (committed is None or offset >= committed) and offset not in acked_index:
                        acked_index.add(offset)
                        acked.append(offset)
                        self._n_acked += 1
            notify(self._waiting_for_ack)

    async def wait_empty(self) -> None:
        lane = self._batch_lane
        if lane is not None:
            # Also called when the consumer itself stops, after the app's drain: a handler
            # retrying an unreachable database kept a SIGTERMed worker until it was killed.
            with contextlib.suppress(TimeoutError):
                async with cast(WorkerApp, self.app).within_drain():
                    await lane.quiesce()
        await super().wait_empty()

    async def _wait_for_ack(self, timeout: float) -> None:  # noqa: ASYNC109 (Faust's signature)
        """Waits up to `timeout` for the next acknowledgement, as Faust's does, without ever
        dropping a cancellation of the waiting task.

        Faust's swallows it (and Python 3.11's `wait_for` drops one that lands as the awaited
        future completes), so `wait_empty` went on looping: a stopping worker's bounded drain
        (`WorkerApp.within_drain`) never ended while an agent held a record, and the worker
        had to be killed. Faust's loop also waits for a commit in progress, swallowing a
        cancellation there too: past the drain deadline (and a second for its cancellation
        to arrive) each turn ends the wait itself.
        """
        app = cast(WorkerApp, self.app)
        if app.should_stop and asyncio.get_running_loop().time() > app.drain_deadline() + 1.0:
            raise TimeoutError("the stopping worker's drain is over")
        self._waiting_for_ack = asyncio.Future(loop=self.loop)
        try:
            await asyncio.wait({self._waiting_for_ack}, timeout=timeout)
        finally:
            self._waiting_for_ack = None

    async def wait_first(
        self,
        *coros: WaitArgT,
        timeout: Seconds | None = None,  # noqa: ASYNC109 (mode's signature)
    ) -> WaitResults:
        """Faust's fetch loop delivers each record with `wait_first(callback(message),
        suspend_flow.wait())`: a delivery (`streams.eager.Delivery`) is run at once as far as it
        goes, and only one that waits is raced against the suspended flow, as Faust races it."""
        if (
            STEP_IN_PLACE
            and coros
            and isinstance(coros[0], Delivery)
            and not self.suspend_flow.is_set()
            and not self.should_stop
        ):
            delivery, others = coros[0], coros[1:]
            try:
                finished, outcome = first_step(delivery)
            except BaseException:
                _close_unstarted(others)
                raise
            if finished:
                _close_unstarted(others)
                return WaitResults([delivery], [outcome], False)
            raced = await super().wait_first(outcome, *others, timeout=cast(Seconds, timeout))
            done = [delivery if winner is outcome else winner for winner in raced.done]
            return WaitResults(done, raced.results, raced.stopped)
        # mode's own default is None, its annotation notwithstanding.
        return await super().wait_first(*coros, timeout=cast(Seconds, timeout))

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:  # noqa: ASYNC109 (Faust's signature)
        async for tp, message in super().getmany(timeout):
            self._read_marks.being_read = message
            yield tp, message

    def ack(self, message: Message) -> bool:
        """Counts a message as handled only if the streams could have handled it.

        A stream skips a message of an earlier consumer generation, or one read while the
        flow is stopped for a rebalance, and acknowledges it anyway; the rebalance reads it
        again, and counting it would let the commit pass it unhandled."""
        if self.is_current(message.generation_id):
            return super().ack(message)
        with ack_lock:
            message.acked = True
            self._unacked_messages.discard(message)
            # A rebalance waits for the unacknowledged messages to drain.
            notify(self._waiting_for_ack)
        return False

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Also seeks source partitions without a committed offset, to their beginning.

        aiokafka seeks only partitions with a committed offset above 0; the rest went on
        from where they were. After a rebalance Faust empties the streams' queues and
        relies on this seek to read those records again: a stream that was behind (the
        interview agent waiting for the tenant statuses at start-up) never saw the first
        records of each partition, and Faust, with nothing committed, committed from the
        first record every stream had acknowledged. The throughput benchmark lost 342 of
        10,000 interview steps that way."""
        committed = dict(await super().seek_to_committed())
        uncommitted = [
            tp
            for tp, offset in committed.items()
            if not offset and self.app.topics.acks_enabled_for(tp.topic)
        ]
        self._start_offsets = {}
        if uncommitted:
            self._start_offsets = dict(await self.earliest_offsets(*uncommitted))
            await self.seek_wait(self._start_offsets)
            committed.update(self._start_offsets)
        return committed

    def _new_offset(self, tp: TP) -> int | None:
        head = self._committed_offset[tp]
        if head is None:
            head = self._start_offsets.get(tp)
        # The next offset to commit from must itself be acknowledged by every stream: Faust
        # commits from the lowest acknowledged one when it is just past the committed one.
        if head is not None and not self._head_acknowledged(tp, head):
            return None
        return super()._new_offset(tp)

    def _head_acknowledged(self, tp: TP, head: int) -> bool:
        return head in self._acked_index[tp] or bool(self._gap[tp].overlaps(head))


def _close_unstarted(awaitables: Iterable[WaitArgT]) -> None:
    # The coroutines `wait_first` was given and never started (Faust's `suspend_flow.wait()`):
    # closed, not left to warn that they were never awaited.
    for awaitable in awaitables:
        if inspect.iscoroutine(awaitable):
            awaitable.close()


def _apply_in_aiokafka(
    consumer: AIOKafkaConsumer, tps: set[TP], fetching: bool, changelogs: frozenset[str]
) -> None:
    """On the consumer's loop: pauses or resumes the partitions still assigned, and counts
    those fetched."""
    assigned = consumer.assignment()
    partitions = [TopicPartition(tp.topic, tp.partition) for tp in tps if tp in assigned]
    if fetching:
        consumer.resume(*partitions)
    else:
        consumer.pause(*partitions)
    fetched = assigned - consumer.paused()
    changelog = sum(1 for tp in fetched if tp.topic in changelogs)
    FETCHED_PARTITIONS.labels("changelog").set(changelog)
    FETCHED_PARTITIONS.labels("input").set(len(fetched) - changelog)


class WorkerApp(faust.App):
    # Topics whose records skip Faust's streams (streams.batches); set by the composition root.
    batch_lane: BatchLane | None = None
    # How long a stopping worker waits for its agents to acknowledge the records they hold;
    # set by the composition root.
    shutdown_drain_s: float = 20.0
    # The longest a fetch waits at the broker (BoundedFetchWaitThread); set by the composition
    # root.
    fetch_max_wait_s: float = 0.025
    # How much of its recent reading a fetch waits for (streams.pacing; 0: none); set by the
    # composition root.
    fetch_pacing_s: float = 0.0
    # Set when a rebalance came while the worker stopped: it left its group then, and its
    # partitions may be another worker's by its shutdown.
    left_group_stopping: bool = False
    _drain_deadline: float | None = None

    def drain_deadline(self) -> float:
        """Loop time at which a stopping worker stops waiting for the records its agents hold:
        `shutdown_drain_s` after it first waited, for all its waits together."""
        if self._drain_deadline is None:
            self._drain_deadline = asyncio.get_running_loop().time() + self.shutdown_drain_s
        return self._drain_deadline

    @contextlib.asynccontextmanager
    async def within_drain(self) -> AsyncIterator[None]:
        """The body, cut short with TimeoutError at the drain deadline if the worker is
        stopping; without a bound otherwise (a rebalance: a revoked partition's tables must
        hold all their writes)."""
        if not self.should_stop:
            yield
            return
        async with asyncio.timeout_at(self.drain_deadline()):
            yield

    async def _consumer_wait_empty(self, consumer: ConsumerT, logger: Any) -> None:
        """A rebalance waits for every held record; a stopping worker waits at most
        `shutdown_drain_s`. Faust's wait has no bound: a worker once still waited for 50
        inbound records 6 minutes after SIGTERM. The records it gives up on are not committed,
        so a restart reads them again, as after a kill -9 (their effects carry ids derived
        from them)."""
        try:
            async with self.within_drain():
                await super()._consumer_wait_empty(consumer, logger)
        except TimeoutError:
            # Faust logs the agents' tracebacks only at INFO: say which agent held them.
            logger.warning(
                "stopping with records unacknowledged after %.0f s; they are read again after "
                "a restart. Agents:\n%s",
                self.shutdown_drain_s,
                self.agents.human_tracebacks(),
            )

    async def _on_partitions_revoked(self, revoked: set[TP]) -> None:
        """A rebalance while the worker stops: Faust leaves the group at once, without the
        revocation signal, and whatever its receivers save as partitions leave (the SLA
        windows) was lost, or written at shutdown after another worker had taken the
        partitions and saved newer copies. Until it leaves, the partitions are still this
        worker's: the signal goes out first."""
        try:
            if self.should_stop and not self.left_group_stopping:
                self.left_group_stopping = True
                await self.on_partitions_revoked.send(revoked)
        finally:
            # Leaves the group whatever a receiver raised: a stopping worker that stayed took
            # partitions in the next generation and sat on them until it closed.
            await super()._on_partitions_revoked(revoked)

    def _new_producer(self) -> ProducerT:
        return EffectsFirstProducer(self.transport, loop=self.loop, beacon=self.beacon)

    def _new_consumer(self) -> ConsumerT:
        return AcknowledgedOnlyConsumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.loop,
        )


def put_in_partition(table: TableT[Any, Any], partition: int, key: Any, value: Any) -> None:
    """`table[key] = value`, with the changelog record on `partition`.

    Faust writes a change to the partition of the current event; a batch lane handler has no
    current event, and its batch spans partitions.
    """
    table.data[key] = value
    if isinstance(table, HeldChangelogTable):
        table.write_changelog(partition, key, value)
    else:
        table.send_changelog(partition, key, value)


def delete_in_partition(table: TableT[bytes, Any], partition: int, key: bytes) -> None:
    """`put_in_partition`'s delete: a tombstone, so compaction frees the changelog too."""
    table.data.pop(key, None)
    if isinstance(table, HeldChangelogTable):
        table.write_changelog(partition, key, None, value_serializer="raw")
    else:
        table.send_changelog(partition, key, None, value_serializer="raw")
