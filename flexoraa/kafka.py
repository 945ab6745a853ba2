"""Kafka plumbing shared by the processes: topic creation and the acknowledged publisher."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.partitioner import murmur2
from prometheus_client import Counter, Gauge

from flexoraa.settings import Settings
from schemas.topics import TopicNames

logger = logging.getLogger(__name__)

METADATA_FAILURES = Counter(
    "flexoraa_kafka_metadata_failures",
    "Cluster metadata updates that failed (no broker answered), each followed by a backoff",
)
CLIENTS_FAILING = Gauge(
    "flexoraa_kafka_clients_failing",
    "Kafka clients of this process whose last metadata update failed, and publishers whose "
    "last producer start failed",
)
# Set on a client once its updates back off: wrapping twice would double the backoff.
_BACKS_OFF = "_flexoraa_backs_off"
# Set on a producer's accumulator once it drains whole nodes.
_DRAINS_WHOLE_NODES = "_flexoraa_drains_whole_nodes"
# ...and once its records linger only while the producer is busy.
_LINGERS_WHILE_BUSY = "_flexoraa_lingers_while_busy"


# Kafka's Java client's `retry.backoff.max.ms` default: an outage's attempts settle at about
# one a second per client, and a client sees the broker back within a second of its return.
RETRY_BACKOFF_MAX_S = 1.0
RETRY_BACKOFF_JITTER = 0.2


class RetryBackoff:
    """Waits between failed attempts: `first_s`, doubled after each failure, never above `max_s`.

    `next_wait(spread)` takes a number in [-1, 1] that moves the wait by up to
    `RETRY_BACKOFF_JITTER` of it either way (a caller passes a random one; a test a fixed one),
    then caps it at `max_s`, as Kafka's `ExponentialBackoff` does.
    """

    __slots__ = ("_failures", "first_s", "max_s")

    def __init__(self, first_s: float, max_s: float) -> None:
        if first_s < 0 or max_s < first_s:
            raise ValueError(f"backoff from {first_s} s up to {max_s} s")
        self.first_s = first_s
        self.max_s = max_s
        self._failures = 0

    def next_wait(self, spread: float) -> float:
        # min() before the power: 2.0 ** 1100 overflows a float.
        doublings = min(self._failures, 64)
        self._failures += 1
        wait = min(self.first_s * 2.0**doublings, self.max_s)
        jittered = wait * (1.0 + RETRY_BACKOFF_JITTER * max(-1.0, min(1.0, spread)))
        return min(jittered, self.max_s)

    def reset(self) -> None:
        self._failures = 0


def back_off_failed_metadata_updates(client: AIOKafkaClient) -> AIOKafkaClient:
    """Makes a failed metadata update end only after a backoff, and counts it.

    aiokafka runs a metadata update whenever something asks for one, with no pause after a
    failure. With the broker down, a producer holding undelivered batches asks again as soon as
    the last attempt fails (its sender waits on the update, not on a backoff). A worker under
    load when the broker stopped spent a whole core on it, 5,000 to 7,000 attempts a second,
    for as long as the outage lasted (measured on this 2-core machine). Kafka's Java client
    waits between attempts, and so does this, the same way (KIP-580): the client's
    `retry_backoff_ms` after the first failure, doubling with each failure after it up to
    `RETRY_BACKOFF_MAX_S`, each wait within 20 % either side so that a process's clients do
    not retry in step, and back to the first wait after a success. A fixed 100 ms left a worker
    with four clients making 40 attempts a second through a whole outage (bench.outage). While
    it waits, every caller shares the update in progress, so the client makes at most one
    attempt per backoff (plus the attempt's own time).

    The client also shows in `flexoraa_kafka_clients_failing` from a failed update until a
    successful one or its close, and keeps trying once per backoff meanwhile: an outage is
    visible however slowly attempts fail (a broker host that drops packets makes each one wait
    out the request timeout), and its end within a backoff.
    """
    if getattr(client, _BACKS_OFF, False):
        return client
    update = client._metadata_update
    close = client.close
    first_s: float = client._retry_backoff
    # A retry backoff set above the maximum is used as it is, every time (Kafka's client would
    # wait the maximum instead): whoever set it asked for waits that long.
    backoff = RetryBackoff(first_s=first_s, max_s=max(first_s, RETRY_BACKOFF_MAX_S))
    failing = False

    def mark(now_failing: bool) -> None:
        nonlocal failing
        if now_failing != failing:
            CLIENTS_FAILING.inc(1 if now_failing else -1)
            failing = now_failing

    async def update_then_back_off(cluster: Any, topics: Any) -> bool:
        updated: bool = await update(cluster, topics)
        mark(not updated)
        if updated:
            backoff.reset()
        else:
            METADATA_FAILURES.inc()
            await asyncio.sleep(backoff.next_wait(random.uniform(-1.0, 1.0)))
            # And again after this one, until one succeeds: a client that reconnects on its
            # old metadata makes no update of its own for minutes (metadata_max_age_ms), and
            # would count as failing long after the broker was back. Scheduled, not called:
            # the update in progress must end first for the request to start a new one.
            asyncio.get_running_loop().call_soon(client.force_metadata_update)
        return updated

    async def close_and_forget() -> None:
        mark(False)  # a closed client is no longer anyone's connection to Kafka
        await close()

    # Per instance: the client's own synchroniser calls `self._metadata_update`, and its
    # producer or consumer calls `self.close` when it stops.
    client._metadata_update = update_then_back_off
    client.close = close_and_forget
    setattr(client, _BACKS_OFF, True)
    return client


def drain_whole_nodes(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    """Makes a request to a broker carry every partition's batch for it, once one is due.

    aiokafka sends each partition's batch when its own linger is over. A worker's round of
    records spreads over dozens of partitions, each batch made a little later than the one
    before, so its first batch went alone and the rest a request or two later: at 200
    messages a second the worker made 483 produce requests a second, 3.9 partitions each.
    Kafka's Java client drains a broker's batches together once any of them is due (its
    `RecordAccumulator.drain`), and so does this: 158 requests a second, 11.8 partitions
    each, the worker's CPU 0.49 -> 0.42 of a core and the broker's 0.25 -> 0.21
    (bench.freshness at 200/s, request counts from the broker's request log). A batch taken
    early goes sooner; the records for its partition that come after it start a new batch,
    which waits out its own linger (and the request in flight), where they would have joined
    the one taken. A partition with a request in flight (muted) waits for its answer, as
    before, so records stay in order and keep their sequence numbers; a broker with one in
    flight gets nothing. Unlike Java's, aiokafka's drain has no cap on a request's size, and
    neither has this: a request holds at most one batch per partition.
    """
    accumulator = producer._message_accumulator
    if getattr(accumulator, _DRAINS_WHOLE_NODES, False):
        return producer
    drain_due = accumulator.drain_by_nodes

    def drain_by_nodes(
        ignore_nodes: Any, muted_partitions: Any = frozenset()
    ) -> tuple[dict[int, dict[Any, Any]], bool]:
        nodes, unknown_leaders_exist = drain_due(ignore_nodes, muted_partitions)
        if not nodes:
            return nodes, unknown_leaders_exist
        cluster = accumulator._cluster
        for tp in list(accumulator._batches):
            if tp in muted_partitions:
                continue
            leader = cluster.leader_for_partition(tp)
            if leader not in nodes or tp in nodes[leader]:
                continue
            batch = accumulator._pop_batch(tp)
            if batch.is_empty():
                batch.done_noack()  # as aiokafka's drain does with one
            else:
                nodes[leader][tp] = batch
        # The wake-up aiokafka set for the next batch due is for nothing when none is left.
        if not accumulator._batches and accumulator._wakeup_handle is not None:
            accumulator._wakeup_handle.cancel()
            accumulator._wakeup_handle = None
        return nodes, unknown_leaders_exist

    # Per instance: the producer's sender calls `self._message_accumulator.drain_by_nodes`.
    accumulator.drain_by_nodes = drain_by_nodes
    setattr(accumulator, _DRAINS_WHOLE_NODES, True)
    return producer


def linger_while_busy(producer: AIOKafkaProducer, linger_ms: int) -> AIOKafkaProducer:
    """Makes a record linger `linger_ms` only when the record before it was sent less than
    that long ago; a record after a quiet spell is sent at once (unless it joins a batch
    already lingering, or its broker has a request in flight, as any record would).

    Without a linger each record the API accepts is a produce request of its own unless one
    is already in flight: at 1,000 messages a second, 730 requests a second of 1.4 records,
    each a loopback send the API and the broker both pay for. A fixed linger batches them,
    but makes a lone request wait it out too (2 ms of linger cost a quiet API 3.7 ms at p50).
    Under load a record now waits up to `linger_ms` for the ones after it, and with
    `drain_whole_nodes` a request carries every partition's batch once one is due: at 800
    messages a second the 202's p50 was 2.2 ms against 0.93, for 0.48 ms of API CPU per
    request against 0.52 (bench.ingest).
    """
    accumulator = producer._message_accumulator
    if getattr(accumulator, _LINGERS_WHILE_BUSY, False):
        return producer
    linger_s = linger_ms / 1000
    add, append_batch = accumulator.add_message, accumulator._append_batch
    previous_send = -float("inf")
    # The linger of the record being added, decided when it came: a record whose partition's
    # batch is full waits for that batch to leave before making its own, and meanwhile other
    # records come and go. Batches made outside `add_message` (`send_batch`) linger none.
    record_linger: ContextVar[float] = ContextVar("record_linger", default=0.0)

    async def add_message(*args: Any, **kwargs: Any) -> Any:
        nonlocal previous_send
        now = time.monotonic()
        decided = record_linger.set(linger_s if now - previous_send < linger_s else 0.0)
        previous_send = now
        try:
            return await add(*args, **kwargs)
        finally:
            record_linger.reset(decided)

    def append_batch_lingering(builder: Any, tp: Any) -> Any:
        # aiokafka copies the accumulator's linger into each batch it makes, here only.
        accumulator._linger_time = record_linger.get()
        return append_batch(builder, tp)

    # Per instance, as drain_whole_nodes: the producer calls `self._message_accumulator`'s.
    accumulator.add_message = add_message
    accumulator._append_batch = append_batch_lingering
    setattr(accumulator, _LINGERS_WHILE_BUSY, True)
    return producer


# Each remembered key costs about 200 bytes: 65,536 of them about 13 MB.
KEY_HASHES_KEPT = 65_536


@functools.lru_cache(maxsize=KEY_HASHES_KEPT)
def _key_hash(key: bytes) -> int:
    hashed: int = murmur2(key)
    return hashed & 0x7FFFFFFF


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner puts `key` on, among `partitions`."""
    return _key_hash(key) % partitions


class KeyPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, as Kafka's Java client), with each
    key's hash remembered.

    aiokafka computes murmur2 in Python: 7.3 us a key, and an inbound message's effects (a
    lead event, a question, its outbound message, usage) hash the same few keys again and
    again. A remembered hash takes well under a microsecond."""

    def __call__(
        self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
    ) -> int:
        if key is None:
            return random.choice(available or all_partitions)
        return all_partitions[partition_of(key, len(all_partitions))]


class TopicMismatch(RuntimeError):
    """A topic exists with a partition count other than the co-partitioned one."""


class TopicsNotCreated(RuntimeError):
    """The broker refused to create topics (its answer names the reason per topic)."""


@dataclass(frozen=True, slots=True)
class _CreationAnswer:
    created: list[str]
    # Refused for now (a controller timing out or moving): they may exist in a moment.
    pending: list[str]
    # "topic: error" for each refused for good (a replication factor the cluster cannot meet).
    refused: list[str]


def _creation_answer(topic_errors: Sequence[tuple[Any, ...]]) -> _CreationAnswer:
    """What a CreateTopics answer did per topic. The admin client does not raise for these: a
    refused topic was reported created, and the worker then waited for it until its start-up
    timed out."""
    answer = _CreationAnswer([], [], [])
    for topic, code, *message in topic_errors:
        if code == 0:
            answer.created.append(topic)
        elif code == TopicAlreadyExistsError.errno:  # created meanwhile by another process
            continue
        elif for_code(code).retriable:
            answer.pending.append(topic)
        else:
            detail = f" ({message[0]})" if message and message[0] else ""
            answer.refused.append(f"{topic}: {for_code(code).__name__}{detail}")
    return answer


# How long topics whose creation timed out (or met a moving controller) may take to appear.
_CREATION_WAIT_S = 30.0
# DescribeConfigs' source of a value set on the topic itself (protocol versions 1 and up).
_TOPIC_OVERRIDE = 1


@dataclass(frozen=True, slots=True)
class TopicsEnsured:
    created: list[str]
    # Existing compacted topics whose segment settings were brought in line with the settings.
    reconfigured: list[str]


def compacted_topic_configs(settings: Settings) -> dict[str, str]:
    return {
        "cleanup.policy": "compact",
        "segment.ms": str(settings.changelog_segment_ms),
        "segment.bytes": str(settings.changelog_segment_bytes),
    }


async def ensure_topics(settings: Settings) -> TopicsEnsured:
    """Create every topic of the pipeline that is missing, and give existing compacted topics
    the configured segment settings.

    Lead-keyed topics must share one partition count so that one worker owns a lead's whole
    state, so an existing topic with another count is an error, not something to live with.
    """
    topics = TopicNames(settings.topic_prefix)
    names = topics.all()
    compacted = topics.compacted()
    compacted_configs = compacted_topic_configs(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers, request_timeout_ms=10_000
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        present = [name for name in names if name in existing]
        if present:
            for description in await admin.describe_topics(present):
                count = len(description["partitions"])
                if count != settings.kafka_partitions:
                    raise TopicMismatch(
                        f"topic {description['topic']} has {count} partitions, "
                        f"KAFKA_PARTITIONS is {settings.kafka_partitions}"
                    )
        missing = [name for name in names if name not in existing]
        specs = {
            name: NewTopic(
                name=name,
                num_partitions=settings.kafka_partitions,
                replication_factor=settings.kafka_replication_factor,
                topic_configs=compacted_configs if name in compacted else {},
            )
            for name in missing
        }
        created = await _create(admin, specs) if specs else []
        reconfigured = await _reconfigure(
            admin, [name for name in present if name in compacted], compacted_configs
        )
        return TopicsEnsured(sorted(created, key=names.index), reconfigured)
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, specs: dict[str, NewTopic]) -> list[str]:
    """Creates the topics, asking again for those refused for now (a controller timing out or
    still being elected: the request may never have reached one) until _CREATION_WAIT_S has
    passed; returns those created. Raises TopicsNotCreated for a refusal for good, or for
    topics still refused at the deadline."""
    deadline = time.monotonic() + _CREATION_WAIT_S
    created: list[str] = []
    wanted = list(specs)
    while True:
        answer = _creation_answer(
            (await admin.create_topics([specs[name] for name in wanted])).topic_errors
        )
        if answer.refused:
            raise TopicsNotCreated("the broker refused to create " + "; ".join(answer.refused))
        created += answer.created
        if not answer.pending:
            return created
        if time.monotonic() >= deadline:
            raise TopicsNotCreated(
                f"topics not created within {_CREATION_WAIT_S:.0f} s: {answer.pending}"
            )
        wanted = answer.pending
        await asyncio.sleep(0.5)


async def missing_topics(settings: Settings) -> list[str]:
    """The pipeline's topics the broker does not list (yet)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers, request_timeout_ms=10_000
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [name for name in TopicNames(settings.topic_prefix).all() if name not in existing]


async def wait_for_topics(
    settings: Settings, *, poll_s: float = 1.0, say_every_s: float = 30.0
) -> None:
    """Returns once the broker lists every pipeline topic, saying what is missing meanwhile.

    A worker subscribed to a topic the broker does not list yet ignores it until its next
    metadata refresh, up to 5 minutes later (aiokafka's metadata_max_age_ms), and stays
    unready all that while: started before `flexoraa topics create`, or right after it on a
    busy broker (a test's worker waited past its 2 minutes, 3 runs of 3)."""
    said_at = -say_every_s
    while True:
        try:
            missing = await missing_topics(settings)
            problem = f"topics missing: {', '.join(missing)}; run `flexoraa topics create`"
        # OSError: TimeoutError too (a broker that accepts the connection and then does not
        # answer), which is not a KafkaError.
        except (KafkaError, OSError) as exc:
            missing, problem = ["?"], f"Kafka at {settings.kafka_bootstrap_servers}: {exc!r}"
        if not missing:
            return
        if time.monotonic() - said_at >= say_every_s:
            logger.warning("worker waiting before it subscribes: %s", problem)
            said_at = time.monotonic()
        await asyncio.sleep(poll_s)


async def _reconfigure(
    admin: AIOKafkaAdminClient, names: list[str], wanted: dict[str, str]
) -> list[str]:
    """Sets `wanted` on the topics whose own settings differ; returns their names.

    AlterConfigs replaces all of a topic's own settings, so those set before (by an operator,
    say) are sent again with the wanted ones."""
    if not names:
        return []
    changes = []
    for response in await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    ):
        for error_code, error_message, _, name, entries, *_ in response.resources:
            if error_code:
                raise KafkaError(f"describing the configs of topic {name}: {error_message}")
            # (name, value, read only, source, sensitive, synonyms); version 0 (brokers before
            # Kafka 1.1) has "is default" where the source is.
            own = {
                entry[0]: entry[1]
                for entry in entries
                if (not entry[3] if response.API_VERSION == 0 else entry[3] == _TOPIC_OVERRIDE)
            }
            if any(own.get(key) != value for key, value in wanted.items()):
                changes.append(ConfigResource(ConfigResourceType.TOPIC, name, {**own, **wanted}))
    if not changes:
        return []
    for response in await admin.alter_configs(changes):
        for error_code, error_message, _, name in response.resources:
            if error_code:
                raise KafkaError(f"configuring topic {name}: {error_message}")
    return [change.name for change in changes]


def acknowledged_producer(
    settings: Settings, *, linger_ms: int, **options: Any
) -> AIOKafkaProducer:
    """A producer whose sends return once every in-sync replica has the record (acks=all,
    idempotent, so a retried batch is written once), waiting at most KAFKA_PRODUCE_TIMEOUT_MS
    for each request's answer, and backing off after a failed metadata update. Not started."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        request_timeout_ms=settings.kafka_produce_timeout_ms,
        **options,
    )
    back_off_failed_metadata_updates(producer.client)
    drain_whole_nodes(producer)
    return producer


class PublishUnavailable(RuntimeError):
    """Kafka did not acknowledge the event in time; the caller must not report success."""


class EventPublisher:
    """Produces events and returns only once Kafka acknowledged them (acks=all).

    The producer is started lazily and restarted after a failure, so an API that came up while
    Kafka was down starts accepting events once Kafka is back (within START_RETRY_S).

    One start attempt runs at a time, shared by every caller that needs the producer meanwhile,
    and none runs for START_RETRY_S after one failed: callers in between are refused at once.
    Each caller used to make its own attempt, one after another behind a lock. A broker that
    refuses connections cost a new producer and connection per request (the API, at 100
    requests a second during an outage: 88 connection attempts a second in its log; now 1).
    One whose
    host never answers makes each attempt wait out the timeout, so the Nth of N concurrent
    callers waited N timeouts and the queue grew as long as the outage. The refusal follows
    only a failed start: a producer that started and then lost the broker still costs each
    send its timeout, and is then replaced.
    """

    # After a failed start, callers are refused for this long without another attempt.
    START_RETRY_S = 1.0

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._starting: asyncio.Task[AIOKafkaProducer] | None = None
        self._timeout_s = settings.kafka_produce_timeout_ms / 1000
        self._start_failed_at = -float("inf")
        self._start_failure = ""
        # A failed start closes its producer, and with it the client that counted as failing:
        # the publisher counts instead, until a start succeeds or it closes.
        self._counted_failing = False

    async def _ensure_started(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        if time.monotonic() - self._start_failed_at < self.START_RETRY_S:
            raise PublishUnavailable(f"Kafka is unreachable: {self._start_failure}")
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
            # Retrieved here too: every caller waiting for it may have given up.
            self._starting.add_done_callback(_retrieve_outcome)
        # Shielded: a caller that gives up (a readiness probe's own timeout) leaves the
        # attempt to the others, and its outcome is still recorded.
        return await asyncio.shield(self._starting)

    def _new_producer(self) -> AIOKafkaProducer:
        """An unstarted producer whose records linger only under load (API_PRODUCER_LINGER_MS)."""
        return linger_while_busy(
            acknowledged_producer(self._settings, linger_ms=0, partitioner=KeyPartitioner()),
            self._settings.api_producer_linger_ms,
        )

    async def _start(self) -> AIOKafkaProducer:
        producer = self._new_producer()
        try:
            try:
                await asyncio.wait_for(producer.start(), self._timeout_s)
            except (KafkaError, OSError, TimeoutError) as exc:
                await _close_quietly(producer)
                self._start_failed_at, self._start_failure = time.monotonic(), repr(exc)
                self._count_as_failing(True)
                raise PublishUnavailable(f"Kafka is unreachable: {exc!r}") from exc
            except asyncio.CancelledError:  # the publisher is closing
                await _close_quietly(producer)
                raise
            self._producer = producer
            self._count_as_failing(False)
            return producer
        finally:
            # Cleared with the outcome in place: a later caller finds the producer or the
            # refusal, never a finished attempt.
            self._starting = None

    async def publish(self, topic: str, key: bytes | None, value: bytes) -> None:
        producer = await self._ensure_started()
        try:
            # A timeout scope, not `wait_for`: in Python 3.11 that runs the send in a task of
            # its own, one more task and wake-up for every request the API accepts.
            async with asyncio.timeout(self._timeout_s):
                await producer.send_and_wait(topic, value, key=key)
        except (KafkaError, OSError, TimeoutError) as exc:
            logger.warning("publish to %s failed: %r", topic, exc)
            await self._discard(producer)
            raise PublishUnavailable(f"Kafka did not acknowledge the event: {exc!r}") from exc

    async def _discard(self, producer: AIOKafkaProducer) -> None:
        """Replace a producer that failed: after a broker restart an idempotent producer can
        stay wedged on its old connection and sequence numbers, refusing every later send.
        Concurrent sends on it fail too (503, the client retries); the next call starts anew."""
        if self._producer is not producer:
            return  # another failed call already replaced it
        self._producer = None
        await _close_quietly(producer)

    async def is_reachable(self) -> bool:
        try:
            producer = await self._ensure_started()
            await asyncio.wait_for(producer.client.fetch_all_metadata(), self._timeout_s)
        except (PublishUnavailable, KafkaError, OSError, TimeoutError):
            return False
        return True

    def _count_as_failing(self, failing: bool) -> None:
        if failing != self._counted_failing:
            CLIENTS_FAILING.inc(1 if failing else -1)
            self._counted_failing = failing

    async def close(self) -> None:
        starting = self._starting
        if starting is not None:
            starting.cancel()
            await asyncio.wait([starting])
        self._count_as_failing(False)
        if self._producer is not None:
            await _close_quietly(self._producer)
            self._producer = None


def _retrieve_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _close_quietly(producer: AIOKafkaProducer, timeout_s: float = 10.0) -> None:
    try:
        # Bounded: stopping flushes pending batches, which a broker that is down never takes.
        await asyncio.wait_for(producer.stop(), timeout_s)
    except Exception:
        logger.debug("producer stop failed", exc_info=True)


async def delete_topics(settings: Settings) -> list[str]:
    """Delete every topic of this prefix: the pipeline's ("<prefix>.") and Faust's ("<prefix>-")."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        prefixes = (f"{settings.topic_prefix}.", f"{settings.topic_prefix}-")
        names = [name for name in await admin.list_topics() if name.startswith(prefixes)]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()
