"""How a worker table's write reaches the producer: a serialised record held for the next round,
or, where Faust's own path is kept, Faust's FutureMessage; and what a delivered record tells a
store that keeps offsets."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import faust
from faust.types import TP
from faust.types.tuples import FutureMessage, RecordMetadata

from streams.producer import (
    EffectsFirstProducer,
    HeldChangelogTable,
    HeldWrite,
    WorkerApp,
    changelog_delivered,
)


def worker_table(name: str, **conf: Any) -> tuple[HeldChangelogTable, EffectsFirstProducer]:
    app = WorkerApp(name, broker="kafka://127.0.0.1:1", autodiscover=False,
                    Table=HeldChangelogTable, **conf)  # fmt: skip
    table = cast(HeldChangelogTable, app.Table("accounts", key_type=bytes, partitions=4))
    return table, cast(EffectsFirstProducer, app.producer)


def held(producer: EffectsFirstProducer) -> list[Any]:
    return list(producer._held.values())


def test_a_write_with_its_partition_is_held_as_the_record_faust_would_send() -> None:
    table, producer = worker_table("held-table-record")
    assert table.write_changelog(2, b"lead-1", {"n": 1}) == 2
    table.write_changelog(3, b"lead-2", None, value_serializer="raw")  # a delete
    [write, tombstone] = held(producer)
    assert isinstance(write, HeldWrite)
    expected, _ = table.changelog_topic.prepare_value({"n": 1}, table.value_serializer)
    assert (write.topic, write.partition, write.key, write.value) == (
        "held-table-record-accounts-changelog", 2, b"lead-1", expected
    )  # fmt: skip
    assert write.store is None  # memory keeps no offsets
    assert (tombstone.partition, tombstone.key, tombstone.value) == (3, b"lead-2", None)


def test_a_write_in_a_transaction_goes_through_fausts_path() -> None:
    table, producer = worker_table("held-table-faust", processing_guarantee="exactly_once")
    table.app.in_worker = True  # as a running worker's app: sends go in transactions
    assert table.write_changelog(2, b"lead-1", {"n": 1}) == 2
    [write] = held(producer)
    assert isinstance(write, FutureMessage)
    assert (write.message.partition, write.message.key) == (2, b"lead-1")


class VersionHeaderSchema(faust.Schema[bytes, Any]):
    """A schema that stamps each value with a header, in place, as Faust's send lets it."""

    def on_dumps_value_prepare_headers(self, value: Any, headers: Any) -> Any:
        headers["schema-version"] = b"2"
        return headers


def test_a_write_whose_schema_adds_headers_goes_through_fausts_path_with_them() -> None:
    app = WorkerApp("held-table-headers", broker="kafka://127.0.0.1:1", autodiscover=False,
                    Table=HeldChangelogTable)  # fmt: skip
    schema = VersionHeaderSchema(key_type=bytes)
    table = cast(HeldChangelogTable, app.Table("accounts", schema=schema, partitions=4))
    assert table.write_changelog(1, b"lead-1", {"n": 1}) == 1
    [write] = held(cast(EffectsFirstProducer, app.producer))
    # A held record has no headers: this one would have lost the schema's.
    assert isinstance(write, FutureMessage)
    assert write.message.headers == {"schema-version": b"2"}


class OffsetKeepingStore:
    def __init__(self) -> None:
        self.persisted: list[tuple[TP, int]] = []

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        self.persisted.append((tp, offset))


async def test_a_delivered_record_tells_a_store_that_keeps_offsets_where_it_landed() -> None:
    store = OffsetKeepingStore()
    write = HeldWrite("t-changelog", 5, b"k", b"{}", store=cast(Any, store))
    loop = asyncio.get_running_loop()
    delivered: asyncio.Future[Any] = loop.create_future()
    delivered.set_result(RecordMetadata("t-changelog", 5, TP("t-changelog", 5), 41, 0.0))
    changelog_delivered(write, None, delivered)
    failed: asyncio.Future[Any] = loop.create_future()
    failed.set_exception(RuntimeError("not delivered"))
    changelog_delivered(write, None, failed)
    assert store.persisted == [(TP("t-changelog", 5), 41)]
