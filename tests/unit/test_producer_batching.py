"""How the project's producers gather records into produce requests.

- Once one batch for a broker is due, a produce request carries every batch for that broker
  (`drain_whole_nodes`). aiokafka sends each partition's batch when its own linger is over,
  so a worker's round of records, spread over dozens of partitions, went out in several
  requests a few hundred microseconds apart; Kafka's Java client drains a broker's batches
  together.
- The API's records linger only under load (`linger_while_busy`): a lone request's record is
  sent at once, one that follows another closely waits for more to share its request.

These tests drive aiokafka's own accumulator with a controlled clock and partition leaders;
nothing connects to a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.producer import message_accumulator

from flexoraa import kafka
from flexoraa.kafka import (
    EventPublisher,
    acknowledged_producer,
    drain_whole_nodes,
    linger_while_busy,
)
from flexoraa.settings import Settings

P0, P1, P2 = (TopicPartition("leads", partition) for partition in range(3))
# P0 and P1 are led by broker 1, P2 by broker 2.
LEADERS = {P0: 1, P1: 1, P2: 2}
LINGER_S = 1.0


class Clock:
    """What aiokafka's accumulator and flexoraa.kafka read as `time.monotonic()`: moved by the
    test only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Leaders:
    """The cluster metadata aiokafka's drain asks for each partition's leader."""

    def leader_for_partition(self, tp: TopicPartition) -> int:
        return LEADERS[tp]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(message_accumulator, "time", fake)
    monkeypatch.setattr(kafka, "time", fake)
    return fake


async def add(producer: AIOKafkaProducer, tp: TopicPartition) -> None:
    await producer._message_accumulator.add_message(tp, b"key", b"value", timeout=1)


def drain(
    producer: AIOKafkaProducer,
    muted: frozenset[TopicPartition] = frozenset(),
    in_flight: frozenset[int] = frozenset(),
) -> Any:
    nodes, _ = producer._message_accumulator.drain_by_nodes(
        ignore_nodes=set(in_flight), muted_partitions=muted
    )
    return {node: set(batches) for node, batches in nodes.items()}


def unstarted(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    """The producer, its accumulator given the test's leaders (it is never started)."""
    producer._message_accumulator._cluster = Leaders()
    if producer._txn_manager is not None:
        # An idempotent producer's id, which its sender would ask the broker for first.
        producer._txn_manager.set_pid_and_epoch(1, 0)
    return producer


@pytest.fixture
async def lingering() -> AsyncIterator[AIOKafkaProducer]:
    producer = unstarted(AIOKafkaProducer(linger_ms=int(LINGER_S * 1000)))
    yield producer
    await producer.stop()


async def one_due_two_fresh(producer: AIOKafkaProducer, clock: Clock) -> None:
    """P0's batch is due; P1's (same broker) and P2's (another) were just made."""
    await add(producer, P0)
    clock.now += LINGER_S
    await add(producer, P1)
    await add(producer, P2)


async def test_a_due_batch_takes_its_brokers_other_batches_along(
    clock: Clock, lingering: AIOKafkaProducer
) -> None:
    producer = drain_whole_nodes(lingering)
    await one_due_two_fresh(producer, clock)
    # P2's broker has nothing due: its batch lingers on.
    assert drain(producer) == {1: {P0, P1}}
    clock.now += LINGER_S
    assert drain(producer) == {2: {P2}}


async def test_without_it_each_batch_waits_out_its_own_linger(
    clock: Clock, lingering: AIOKafkaProducer
) -> None:
    # What aiokafka does alone, and the reason for the change.
    producer = lingering
    await one_due_two_fresh(producer, clock)
    assert drain(producer) == {1: {P0}}


async def test_nothing_due_sends_nothing(clock: Clock, lingering: AIOKafkaProducer) -> None:
    producer = drain_whole_nodes(lingering)
    await add(producer, P0)
    await add(producer, P1)
    assert drain(producer) == {}
    clock.now += LINGER_S
    assert drain(producer) == {1: {P0, P1}}


async def test_a_partition_with_a_request_in_flight_is_left_for_the_next(
    clock: Clock, lingering: AIOKafkaProducer
) -> None:
    # A muted partition's batch waits for the answer to the one before it: kept in order.
    producer = drain_whole_nodes(lingering)
    await one_due_two_fresh(producer, clock)
    assert drain(producer, muted=frozenset({P1})) == {1: {P0}}
    assert P1 in producer._message_accumulator._batches


async def test_a_broker_with_a_request_in_flight_gets_nothing(
    clock: Clock, lingering: AIOKafkaProducer
) -> None:
    producer = drain_whole_nodes(lingering)
    await one_due_two_fresh(producer, clock)
    assert drain(producer, in_flight=frozenset({1})) == {}
    assert drain(producer) == {1: {P0, P1}}


async def test_batches_taken_early_are_numbered_in_order(clock: Clock) -> None:
    # An idempotent producer numbers a partition's records as its batches leave: a batch
    # taken early must move the partition's next number on by its records, as any other.
    producer = drain_whole_nodes(
        unstarted(AIOKafkaProducer(linger_ms=int(LINGER_S * 1000), enable_idempotence=True))
    )
    next_number = producer._txn_manager.sequence_number
    try:
        await add(producer, P0)
        await add(producer, P0)
        clock.now += LINGER_S
        await add(producer, P1)
        assert drain(producer) == {1: {P0, P1}}  # P1's taken early
        assert (next_number(P0), next_number(P1)) == (2, 1)
        await add(producer, P1)
        clock.now += LINGER_S
        await add(producer, P0)
        assert drain(producer) == {1: {P0, P1}}  # now P0's
        assert (next_number(P0), next_number(P1)) == (3, 2)
    finally:
        await producer.stop()


async def test_the_wake_up_for_batches_taken_early_is_cancelled(
    clock: Clock, lingering: AIOKafkaProducer
) -> None:
    producer = drain_whole_nodes(lingering)
    accumulator = producer._message_accumulator
    await add(producer, P0)
    clock.now += LINGER_S
    await add(producer, P1)
    drain(producer)
    assert accumulator._wakeup_handle is None  # nothing is left to wake the sender for
    await add(producer, P0)
    clock.now += LINGER_S
    await add(producer, P2)
    drain(producer)
    assert accumulator._wakeup_handle is not None  # P2's broker still has it coming


async def test_wrapping_twice_drains_as_once(clock: Clock, lingering: AIOKafkaProducer) -> None:
    producer = drain_whole_nodes(drain_whole_nodes(lingering))
    await one_due_two_fresh(producer, clock)
    assert drain(producer) == {1: {P0, P1}}


async def test_the_workers_and_the_apis_producers_drain_whole_brokers(
    clock: Clock, worker_app: faust.App
) -> None:
    built = [
        worker_app.producer._new_producer(),  # type: ignore[attr-defined]
        acknowledged_producer(Settings(), linger_ms=int(LINGER_S * 1000)),
    ]
    for producer in built:
        assert isinstance(producer, AIOKafkaProducer)
        unstarted(producer)
        # The worker's linger is a setting: the clock moves past whichever it is.
        linger_s = producer._message_accumulator._linger_time
        await add(producer, P0)
        clock.now += linger_s + 0.001  # past it, whatever the floats round to
        await add(producer, P1)
        assert drain(producer) == {1: {P0, P1}}
        await producer.stop()


# --- Records linger only while the producer is busy ---


def busy_lingering(linger_s: float = LINGER_S) -> AIOKafkaProducer:
    """A producer as the API builds it: no linger of its own, lingering only under load."""
    return linger_while_busy(unstarted(AIOKafkaProducer(linger_ms=0)), int(linger_s * 1000))


async def test_a_lone_record_is_sent_at_once(clock: Clock) -> None:
    producer = busy_lingering()
    try:
        await add(producer, P0)
        assert drain(producer) == {1: {P0}}
        clock.now += 2 * LINGER_S  # a quiet spell: the next is alone again
        await add(producer, P1)
        assert drain(producer) == {1: {P1}}
    finally:
        await producer.stop()


async def test_a_record_close_behind_another_lingers_for_the_ones_after_it(
    clock: Clock,
) -> None:
    producer = drain_whole_nodes(busy_lingering())
    try:
        await add(producer, P0)
        assert drain(producer) == {1: {P0}}
        clock.now += LINGER_S / 2
        await add(producer, P1)
        assert drain(producer) == {}  # lingers
        clock.now += LINGER_S / 2
        await add(producer, P0)
        clock.now += LINGER_S / 2
        # P1's linger is over: P0's batch, made after it, shares its request.
        assert drain(producer) == {1: {P0, P1}}
    finally:
        await producer.stop()


async def test_without_it_a_record_close_behind_another_is_sent_at_once(clock: Clock) -> None:
    # What the API's producer did before (linger 0), and the reason for the change.
    producer = unstarted(AIOKafkaProducer(linger_ms=0))
    try:
        await add(producer, P0)
        assert drain(producer) == {1: {P0}}
        clock.now += LINGER_S / 2
        await add(producer, P1)
        assert drain(producer) == {1: {P1}}
    finally:
        await producer.stop()


async def test_a_record_joining_a_batch_keeps_that_batchs_linger(clock: Clock) -> None:
    producer = busy_lingering()
    try:
        await add(producer, P0)
        await add(producer, P0)  # close behind: it joins the batch due at once
        assert drain(producer) == {1: {P0}}
        assert not producer._message_accumulator._batches
    finally:
        await producer.stop()


async def test_a_gap_of_exactly_the_linger_is_a_quiet_spell(clock: Clock) -> None:
    producer = busy_lingering()
    try:
        await add(producer, P0)
        clock.now += LINGER_S
        await add(producer, P1)
        assert drain(producer) == {1: {P0, P1}}
    finally:
        await producer.stop()


async def test_a_record_waiting_for_a_full_batch_keeps_the_linger_it_came_with(
    clock: Clock,
) -> None:
    # A partition's batch holds one of these; the next waits for it to leave, and makes its
    # own batch then, after other records set theirs.
    value = b"v" * 10_000
    producer = linger_while_busy(
        unstarted(AIOKafkaProducer(linger_ms=0, max_batch_size=16_384)), int(LINGER_S * 1000)
    )
    accumulator = producer._message_accumulator
    try:
        await accumulator.add_message(P0, b"key", value, timeout=60)  # alone: due at once
        clock.now += LINGER_S / 2
        # Close behind: it lingers, but first waits for P0's full batch to leave.
        waiting = asyncio.create_task(accumulator.add_message(P0, b"key", value, timeout=60))
        await asyncio.sleep(0)
        clock.now += 2 * LINGER_S
        await add(producer, P1)  # after a quiet spell: due at once
        assert drain(producer) == {1: {P0, P1}}
        await waiting  # its batch is made now
        assert drain(producer) == {}
        clock.now += LINGER_S
        assert drain(producer) == {1: {P0}}
    finally:
        await producer.stop()


async def test_a_lingering_batch_wakes_the_sender_when_its_linger_is_over() -> None:
    # On the real clock and event loop: the sender, asleep on the accumulator's waiter after
    # a drain that found nothing due, is woken for the lingering batch.
    producer = busy_lingering(linger_s=0.02)
    accumulator = producer._message_accumulator
    try:
        await add(producer, P0)
        await add(producer, P1)  # close behind: lingers
        assert drain(producer) == {1: {P0}}
        assert not accumulator.waiter().done()
        await asyncio.wait_for(accumulator.waiter(), timeout=5)
        assert drain(producer) == {1: {P1}}
    finally:
        await producer.stop()


async def test_no_linger_sends_every_record_at_once(clock: Clock) -> None:
    producer = busy_lingering(linger_s=0)
    try:
        await add(producer, P0)
        await add(producer, P1)
        assert drain(producer) == {1: {P0, P1}}
    finally:
        await producer.stop()


async def test_wrapping_twice_lingers_as_once(clock: Clock) -> None:
    producer = linger_while_busy(busy_lingering(), int(LINGER_S * 1000))
    try:
        await add(producer, P0)
        clock.now += LINGER_S / 2
        await add(producer, P1)
        assert drain(producer) == {1: {P0}}
        clock.now += LINGER_S
        assert drain(producer) == {1: {P1}}
    finally:
        await producer.stop()


async def test_the_apis_publisher_lingers_only_while_busy(clock: Clock) -> None:
    linger_s = 0.1  # the setting's most
    publisher = EventPublisher(Settings(api_producer_linger_ms=int(linger_s * 1000)))
    producer = unstarted(publisher._new_producer())
    try:
        await add(producer, P0)
        assert drain(producer) == {1: {P0}}
        clock.now += linger_s / 2
        await add(producer, P1)
        await add(producer, P2)
        assert drain(producer) == {}
        clock.now += linger_s
        assert drain(producer) == {1: {P1}, 2: {P2}}
    finally:
        await producer.stop()
