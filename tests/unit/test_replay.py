"""Table recovery in batches (streams.replay): what it applies, what it skips, and when it ends
recovery. The whole path against a real broker: tests/integration/test_table_replay.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

from aiokafka.structs import ConsumerRecord
from faust.types import TP, Message

from streams.producer import HeldChangelogTable, WorkerApp
from streams.replay import REPLAY_SLICE, ReplayingRecovery, ReplayingTableManager

TOPIC = "replay-test-accounts-changelog"


def recovering(
    name: str, highwaters: dict[int, int]
) -> tuple[HeldChangelogTable, ReplayingRecovery]:
    """A table whose partitions are being recovered up to these highwaters."""
    app = WorkerApp(name, broker="kafka://127.0.0.1:1", autodiscover=False,
                    Table=HeldChangelogTable, TableManager=ReplayingTableManager)  # fmt: skip
    table = cast(HeldChangelogTable, app.Table("accounts", key_type=bytes, partitions=4))
    recovery = cast(ReplayingTableManager, app.tables).recovery
    for partition, highwater in highwaters.items():
        tp = TP(table.changelog_topic.get_topic_name(), partition)
        recovery.add_active(table, tp)
        recovery.active_highwaters[tp] = highwater
        recovery.active_offsets[tp] = -1
    recovery._set_recovery_started()
    return table, recovery


def record(tp: TP, offset: int, key: bytes, value: Any) -> ConsumerRecord[bytes, bytes]:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, key, raw, None, len(key),
                          len(raw), ())  # fmt: skip


def to_message(tp: TP, kept: Any) -> Message:
    return Message(kept.topic, kept.partition, kept.offset, 0.0, 0, kept.headers, kept.key,
                   kept.value, None, tp=tp)  # fmt: skip


def always() -> bool:
    return True


async def test_records_are_applied_in_order_and_recovery_ends_at_the_highwaters() -> None:
    table, recovery = recovering("replay-order", {0: 2, 1: 0})
    tp0, tp1 = (
        TP(table.changelog_topic.get_topic_name(), 0),
        TP(table.changelog_topic.get_topic_name(), 1),
    )
    first = {tp0: [record(tp0, 0, b"a", {"n": 1}), record(tp0, 1, b"a", {"n": 2})]}
    split, rest = recovery.split({**first, TP("other", 0): []})
    assert set(split) == {tp0}
    assert set(rest) == {TP("other", 0)}
    await recovery.replay(first, to_message, always)
    assert table[b"a"] == {"n": 2}
    assert recovery.in_recovery
    assert not recovery.signal_recovery_end.is_set()

    # Read again after a seek (offsets 0 and 1) with the partitions' last records.
    second = {tp0: [*first[tp0], record(tp0, 2, b"b", {"n": 3})],
              tp1: [record(tp1, 0, b"c", {"n": 4})]}  # fmt: skip
    await recovery.replay(second, to_message, always)
    assert (table[b"a"], table[b"b"], table[b"c"]) == ({"n": 2}, {"n": 3}, {"n": 4})
    assert recovery.active_offsets[tp0] == 2
    assert not recovery.in_recovery
    assert recovery.signal_recovery_end.is_set()

    # The next recovery must wait for its own end, not find this one's signal.
    recovery._set_recovery_started()
    assert not recovery.signal_recovery_end.is_set()


async def test_a_delete_removes_the_key() -> None:
    table, recovery = recovering("replay-delete", {0: 1})
    tp = TP(table.changelog_topic.get_topic_name(), 0)
    tombstone = ConsumerRecord(tp.topic, 0, 1, 0, 0, b"a", None, None, 1, 0, ())
    await recovery.replay({tp: [record(tp, 0, b"a", {"n": 1}), tombstone]}, to_message, always)
    assert b"a" not in table


async def test_an_undecodable_record_is_skipped_and_the_rest_applied() -> None:
    table, recovery = recovering("replay-undecodable", {0: 2})
    tp = TP(table.changelog_topic.get_topic_name(), 0)
    batch = [record(tp, 0, b"a", {"n": 1}), record(tp, 1, b"b", b"{not json"),
             record(tp, 2, b"c", {"n": 3})]  # fmt: skip
    await recovery.replay({tp: batch}, to_message, always)
    assert (table[b"a"], table[b"c"]) == ({"n": 1}, {"n": 3})
    assert b"b" not in table
    assert not recovery.in_recovery


async def test_a_rebalance_between_slices_leaves_the_rest_to_the_next_recovery() -> None:
    table, recovery = recovering("replay-rebalance", {0: REPLAY_SLICE + 9})
    tp = TP(table.changelog_topic.get_topic_name(), 0)
    batch = [record(tp, i, f"k{i}".encode(), {"n": i}) for i in range(REPLAY_SLICE + 10)]
    answers = iter([True, False])
    await recovery.replay({tp: batch}, to_message, lambda: next(answers))
    assert len(table) == REPLAY_SLICE
    assert recovery.active_offsets[tp] == REPLAY_SLICE - 1
    assert recovery.in_recovery


async def test_the_loop_gets_a_turn_between_partitions_of_one_large_fetch() -> None:
    per_partition = REPLAY_SLICE * 3 // 4
    table, recovery = recovering("replay-yield", {p: per_partition - 1 for p in range(3)})
    topic = table.changelog_topic.get_topic_name()
    fetch = {TP(topic, p): [record(TP(topic, p), i, f"{p}-{i}".encode(), {"n": i})
                            for i in range(per_partition)] for p in range(3)}  # fmt: skip
    seen_by_the_loop: list[int] = []

    async def observe() -> None:
        seen_by_the_loop.append(len(table))

    observer = asyncio.create_task(observe())
    await recovery.replay(fetch, to_message, always)
    await observer
    # It ran once the first two partitions (a slice's worth) were applied, not at the end.
    assert seen_by_the_loop == [2 * per_partition]
    assert len(table) == 3 * per_partition
