"""The worker's consumer commits an offset only past messages every stream acknowledged."""

from __future__ import annotations

import faust

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
