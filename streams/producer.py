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
stalled every input stream (the token bench fell from 4,700 to 2,000 events/s).

`flush` (which Faust calls before committing offsets and before a rebalance's table recovery)
releases the held writes and waits for every one of them: Faust's own flush gives up on its
buffer after 0.1 s without progress, and offsets were committed ahead of queued writes.

The consumer: an offset is committed only past messages every stream acknowledged. Faust
commits from the lowest acknowledged offset on when it is just one past the committed one, so
a message that some stream never finished (the kill -9 test found one: neither its session
nor its PostgreSQL row, with the messages around it all there) was skipped for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any

import faust
from faust.transport.drivers.aiokafka import Consumer as AiokafkaConsumer
from faust.transport.drivers.aiokafka import Producer as AiokafkaProducer
from faust.types import TP, ConsumerT, ProducerT
from faust.types.tuples import FutureMessage
from mode import Service

logger = logging.getLogger(__name__)


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
    def _new_offset(self, tp: TP) -> int | None:
        committed = self._committed_offset[tp]
        if committed is not None and not self._head_acknowledged(tp, committed):
            acked = self._acked[tp]
            if acked and min(acked) == committed + 1:
                # Exactly the case Faust would commit past. Source topics here are neither
                # compacted nor transactional (at_least_once), so no offset is missing.
                logger.warning(
                    "%s offset %d is not acknowledged by every stream; offsets after it are "
                    "not committed (it is read again after a restart)", tp, committed,
                )  # fmt: skip
                return None
        return super()._new_offset(tp)

    def _head_acknowledged(self, tp: TP, committed: int) -> bool:
        return committed in self._acked_index[tp] or bool(self._gap[tp].overlaps(committed))


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
