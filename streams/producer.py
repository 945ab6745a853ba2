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
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping
from typing import Any

import faust
from faust.transport.drivers.aiokafka import Consumer as AiokafkaConsumer
from faust.transport.drivers.aiokafka import Producer as AiokafkaProducer
from faust.types import TP, ConsumerT, ProducerT
from faust.types.tuples import FutureMessage
from mode import Service


def _write_key(fut: FutureMessage) -> Hashable:
    """The changelog entry a write replaces: (topic, partition, key)."""
    message = fut.message
    return (id(message.channel), message.partition, message.key)


class EffectsFirstProducer(AiokafkaProducer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: dict[Hashable, FutureMessage] = {}
        self._something_held = asyncio.Event()
        self._releasing = asyncio.Lock()

    def send_soon(self, fut: FutureMessage) -> None:
        # Faust sends table changelog records (and only those) through send_soon.
        key = _write_key(fut)
        # Re-inserted, not updated in place: the round publishes in the order of last writes.
        self._held.pop(key, None)
        self._held[key] = fut
        self._something_held.set()

    async def release_held(self) -> None:
        """Publishes the held changelog writes once everything produced before them is
        acknowledged; rounds run one at a time, so a key's later value is never overtaken."""
        async with self._releasing:
            held, self._held = self._held, {}
            self._something_held.clear()
            if not held:
                return
            if self._producer is not None:
                await self._producer.flush()
            for fut in held.values():
                await fut.message.channel.publish_message(fut, wait=False)

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


class AcknowledgedOnlyConsumer(AiokafkaConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Where reading starts in a source partition nothing was committed for yet.
        self._start_offsets: dict[TP, int] = {}

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


class WorkerApp(faust.App):
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
