"""Keys land on the partitions Kafka's default partitioner gives them, hash remembered or not.

Every process must agree: the API produces a lead's messages, the worker its effects, and the
worker's web page routes a read to the partition's owner by the same hash."""

from __future__ import annotations

import uuid
from collections import Counter

from aiokafka.partitioner import DefaultPartitioner

from flexoraa.kafka import KeyPartitioner, partition_of


def test_a_key_goes_where_kafkas_default_partitioner_puts_it_every_time() -> None:
    default, remembered = DefaultPartitioner(), KeyPartitioner()
    keys = [str(uuid.uuid4()).encode() for _ in range(2_000)] + [b"", b"routing", b"\x00\xff"]
    for partitions in (1, 3, 8, 12):
        every = list(range(partitions))
        for _ in range(2):  # computed, then remembered
            for key in keys:
                expected = default(key, every, every)
                assert remembered(key, every, every) == expected
                assert partition_of(key, partitions) == expected


def test_a_key_among_a_subset_of_partitions_indexes_that_list_as_kafka_does() -> None:
    listed = [4, 5, 6, 7]
    key = b"lead-1"
    assert KeyPartitioner()(key, listed, listed) == DefaultPartitioner()(key, listed, listed)


def test_records_without_a_key_spread_over_the_available_partitions() -> None:
    chosen = Counter(KeyPartitioner()(None, [0, 1, 2, 3], [1, 2]) for _ in range(400))
    assert set(chosen) == {1, 2}
    assert set(Counter(KeyPartitioner()(None, [0, 1], []) for _ in range(200))) == {0, 1}
