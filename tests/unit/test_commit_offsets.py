"""The worker's consumer commits an offset only past messages every stream acknowledged."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import faust
import pytest
from faust.types.tuples import ConsumerMessage

from streams.producer import AcknowledgedOnlyConsumer, WorkerApp

TP = faust.types.TP("acme.inbound-messages", 2)


def consumer_with(committed: int | None, acknowledged: list[int]) -> AcknowledgedOnlyConsumer:
    # No broker is reached: the offsets bookkeeping is plain in-memory state.
    app = WorkerApp("commit-offsets-test", broker="kafka://127.0.0.1:1")
    consumer = app.consumer
    assert isinstance(consumer, AcknowledgedOnlyConsumer)
    if committed is not None:
        consumer._committed_offset[TP] = committed
    consumer._acked[TP].extend(acknowledged)
    consumer._acked_index[TP].update(acknowledged)
    return consumer


def test_offsets_acknowledged_from_the_committed_one_on_are_committed() -> None:
    assert consumer_with(30, [30, 31, 32])._new_offset(TP) == 33


def test_an_offset_no_stream_finished_holds_back_every_later_one() -> None:
    # Faust's own rule commits 33 here: offset 30 would never be read again.
    consumer = consumer_with(30, [31, 32])
    assert consumer._new_offset(TP) is None
    consumer._acked[TP].append(30)
    consumer._acked_index[TP].add(30)
    assert consumer._new_offset(TP) == 33


def test_an_offset_in_a_known_gap_counts_as_acknowledged() -> None:
    consumer = consumer_with(30, [31, 32])
    consumer._gap[TP].addi(30, 31)
    assert consumer._new_offset(TP) == 33


def test_with_nothing_committed_the_partitions_first_offset_must_be_acknowledged_first() -> None:
    # Faust's own rule commits 33 here: offsets 30 and 31 would never be read again.
    consumer = consumer_with(None, [32])
    consumer._start_offsets[TP] = 30
    assert consumer._new_offset(TP) is None
    consumer._acked[TP].extend([30, 31])
    consumer._acked_index[TP].update([30, 31])
    assert consumer._new_offset(TP) == 33


def message_at(offset: int, generation_id: int, tp: faust.types.TP = TP) -> ConsumerMessage:
    return ConsumerMessage(
        tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, 1, 1, tp,
        generation_id=generation_id,
    )  # fmt: skip


def source_consumer() -> AcknowledgedOnlyConsumer:
    consumer = consumer_with(None, [])
    consumer.app.topics.acking_topics.add(TP.topic)
    consumer.app.consumer_generation_id = 7
    consumer.app.flow_control.resume()
    return consumer


def test_a_message_of_an_earlier_generation_does_not_count_as_handled() -> None:
    # Faust's streams skip such a message and acknowledge it; the rebalance reads it again.
    consumer = source_consumer()
    consumer._start_offsets[TP] = 30
    assert consumer.ack(message_at(30, generation_id=6)) is False
    assert consumer._new_offset(TP) is None
    assert consumer.ack(message_at(30, generation_id=7)) is True
    assert consumer._new_offset(TP) == 31


def test_a_message_acknowledged_while_the_flow_is_stopped_does_not_count_as_handled() -> None:
    consumer = source_consumer()
    consumer._start_offsets[TP] = 30
    consumer.app.flow_control.suspend()
    assert consumer.ack(message_at(30, generation_id=7)) is False
    assert 30 not in consumer._acked_index[TP]


def test_a_source_record_below_the_read_offset_is_read_again_not_dropped() -> None:
    # A record fetched before a seek moved the mark to 40; the seek reads 30 again.
    consumer = source_consumer()
    marks = consumer._read_marks
    marks[TP] = 40
    marks.being_read = message_at(30, generation_id=7)
    assert marks[TP] is None  # Faust delivers a record whose mark is None
    marks.being_read = message_at(45, generation_id=7)
    assert marks[TP] == 40  # moving forward, the mark still finds gaps


def test_a_changelog_record_below_the_read_offset_is_still_dropped() -> None:
    changelog = faust.types.TP("flexoraa-sessions-changelog", 2)
    consumer = source_consumer()
    marks = consumer._read_marks
    marks[changelog] = 40
    marks.being_read = message_at(30, generation_id=7, tp=changelog)
    assert marks[changelog] == 40


async def _settles(task: asyncio.Future[None], within_s: float) -> bool:
    done, _ = await asyncio.wait({task}, timeout=within_s)
    return bool(done)


async def test_a_stopping_worker_waits_for_held_records_only_so_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = source_consumer()
    app = cast(WorkerApp, consumer.app)
    app.shutdown_drain_s = 0.05
    held = message_at(30, generation_id=7)
    consumer._unacked_messages.add(held)  # an agent never acknowledges it

    async def nothing_to_commit(*args: object, **kwargs: object) -> bool:
        return False  # no broker here

    monkeypatch.setattr(consumer, "commit", nothing_to_commit)
    logger = logging.getLogger("shutdown-drain-test")
    try:
        # A rebalance waits for every held record: revoked partitions' tables must be
        # complete. Its wait can still be cancelled (Faust's own swallowed the cancellation).
        rebalance = asyncio.ensure_future(app._consumer_wait_empty(consumer, logger))
        assert not await _settles(rebalance, 0.3)
        rebalance.cancel()
        assert await _settles(rebalance, 2)
        assert rebalance.cancelled()
        # Stopping: gives up after shutdown_drain_s; the records are read again after a
        # restart.
        app._stopped.set()
        stopping = asyncio.ensure_future(app._consumer_wait_empty(consumer, logger))
        assert await _settles(stopping, 3)
        stopping.result()  # ended by the deadline, not by an error
    finally:
        consumer._stopped.set()  # ends any wait left over by a failure
        await asyncio.sleep(0)
