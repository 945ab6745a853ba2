"""The worker's producer: table changes reach their changelogs only after the effects before them.

An agent sends its effects (usage billed, a question to the lead, lead events) and then changes
its table, which also marks the input as handled. Kafka orders nothing across partitions: with
Faust's producer the changelog record could be acknowledged while an effect sent just before it
was not, and a worker killed in between came back with a table saying "handled" for a message
whose usage row or question never arrived (found by the kill -9 fault test). So a changelog
write is held until every record sent before it is acknowledged; the in-memory table changes
at once (readers see it), only its changelog record waits. Held writes go out in batches, one
producer flush per batch, so agents never wait for them.

`flush` (which Faust calls before committing offsets and before a rebalance's table recovery)
releases the held writes and then waits for every one of them: Faust's own flush gives up on
its buffer after 0.1 s without progress, and offsets were committed ahead of queued writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from faust.transport.drivers.aiokafka import Producer as AiokafkaProducer
from faust.types import ProducerT
from faust.types.tuples import FutureMessage
from mode import Service


class EffectsFirstProducer(AiokafkaProducer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: list[FutureMessage] = []
        self._something_held = asyncio.Event()
        self._releasing = asyncio.Lock()

    def send_soon(self, fut: FutureMessage) -> None:
        # Faust sends table changelog records (and only those) through send_soon.
        self._held.append(fut)
        self._something_held.set()

    async def release_held(self) -> None:
        """Hands the held changelog writes to Faust's buffer once everything produced before
        them is acknowledged; in order, so a key's later value is never overtaken."""
        async with self._releasing:
            held, self._held = self._held, []
            self._something_held.clear()
            if not held:
                return
            if self._producer is not None:
                await self._producer.flush()
            for fut in held:
                self.buffer.put(fut)

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


class WorkerApp(faust.App):
    def _new_producer(self) -> ProducerT:
        return EffectsFirstProducer(self.transport, loop=self.loop, beacon=self.beacon)
