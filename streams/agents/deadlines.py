"""The timer that finds due deadlines and the agent that acts on them (see streams.timers)."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from faust.types import AppT, StreamT, TableT, TopicT
from pydantic import Field, TypeAdapter

from flexoraa.db import while_unreachable
from flexoraa.kafka import partition_of
from schemas.ids import name_based_id
from schemas.messaging import DeadlineReached, DeadlinesReached
from streams.batches import SourceRecord
from streams.dead_letters import decode_or_dead_letter
from streams.metrics import DEADLINES_FIRED
from streams.poison import PoisonRecords
from streams.timers import Scheduler

logger = logging.getLogger(__name__)
_DEADLINE_EVENT_NAMESPACE = uuid.UUID("3e1d8a4c-94b6-4f52-8a41-6b0f2c7d9e13")

# A handler gets the lead's key, the fired deadline and the lead's session (None if unknown).
DeadlineHandler = Callable[[bytes, DeadlineReached, dict[str, Any] | None], Awaitable[None]]
# Told that a deadline failed for a reason of its own and was dead-lettered and cancelled: the
# kind's state can say so, so that nothing sets the same deadline again (streams.poison).
DeadLetteredHook = Callable[[bytes, DeadlineReached], None]
# Deadlines of one partition per record: a bounded record even when a whole backlog is due.
DEADLINES_PER_RECORD = 200
# One lead's deadline (a resume sent by the token gate) or a tick's batch of a partition's.
_fired: TypeAdapter[DeadlineReached | DeadlinesReached] = TypeAdapter(
    Annotated[DeadlineReached | DeadlinesReached, Field(discriminator="kind")]
)


def deadline_event_id(lead_id: str, name: str, due_ms: int) -> str:
    """The same deadline always yields the same event id, so a re-fire is deduplicated."""
    return name_based_id(_DEADLINE_EVENT_NAMESPACE, f"{lead_id}|{name}|{due_ms}")


def register(
    app: AppT,
    *,
    source_topic: TopicT,
    deadlines_topic: TopicT,
    dead_letters: TopicT,
    scheduler: Scheduler,
    sessions: TableT[bytes, Any],
    handlers: dict[str, DeadlineHandler],
    partitions: int,
    tick_s: float,
    poison: PoisonRecords,
    dead_lettered_hooks: dict[str, DeadLetteredHook] | None = None,
) -> None:
    source_name = source_topic.get_topic_name()

    @scheduler.table.on_recover
    async def rebuild_index() -> None:
        # Overdue deadlines of the partitions just assigned fire on the next tick.
        scheduler.rebuild_index()
        logger.info("deadline index rebuilt: %d pending", len(scheduler.index))

    @app.timer(interval=tick_s)
    async def fire_due_deadlines() -> None:
        if app.rebalancing:
            return
        owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == source_name}
        now_ms = int(time.time() * 1000)
        due: dict[int, list[DeadlineReached]] = defaultdict(list)
        for key, name, due_ms in scheduler.index.pop_due(now_ms):
            partition = partition_of(key, partitions)
            if partition not in owned:
                continue
            if scheduler.pending(key).get(name) != due_ms:
                continue  # moved or cancelled since it was indexed
            session = sessions.get(key)
            if session is None:
                # The sessions agent has not taken the lead's first message yet (it lags):
                # without the tenant the record is invalid, and a timer that raises stops the
                # worker. Asked again on the next tick.
                scheduler.index.schedule(key, name, due_ms)
                continue
            due[partition].append(DeadlineReached(
                event_id=deadline_event_id(key.decode(), name, due_ms),
                tenant_id=session["tenant_id"],
                occurred_at=datetime.fromtimestamp(due_ms / 1000, tz=UTC),
                lead_id=key.decode(),
                deadline=name,
                due_ms=due_ms,
                fired_at=datetime.now(UTC),
            ))  # fmt: skip
        for partition, reached in due.items():
            for start in range(0, len(reached), DEADLINES_PER_RECORD):
                batch = DeadlinesReached(
                    partition=partition, deadlines=reached[start : start + DEADLINES_PER_RECORD]
                )
                # The leads' own partition: the agent's table writes land in their changelog.
                await deadlines_topic.send(
                    value=batch.model_dump_json().encode(), partition=partition
                )

    async def act_on(command: DeadlineReached) -> None:
        key = command.lead_id.encode()
        if scheduler.pending(key).get(command.deadline) != command.due_ms:
            return  # already fired, moved, or cancelled: firing is idempotent
        # "scheduled:<id>" deadlines share the handler of their kind.
        kind = command.deadline.split(":", 1)[0]
        handler = handlers.get(kind)
        if handler is None:
            logger.warning("no handler for deadline %s", command.deadline)
            scheduler.cancel(key, command.deadline)
            return
        DEADLINES_FIRED.labels(kind).inc()
        await while_unreachable(handler, key, command, sessions.get(key))
        # Cancelled after the handler's effects, so the changelog write waits for them: a
        # worker killed in between fires the deadline again (the effects' ids repeat) instead
        # of finding it gone and the leak never reported. A handler may have moved it.
        if scheduler.pending(key).get(command.deadline) == command.due_ms:
            scheduler.cancel(key, command.deadline)

    async def act_on_or_dead_letter(command: DeadlineReached, record: SourceRecord) -> None:
        """`act_on`; a deadline whose handler fails for a reason of its own is dead-lettered
        alone (not its record's other deadlines) and cancelled: left pending, it would fire and
        fail again on every tick and after every restart (streams.poison). Its dead letter is
        for inspection: replayed as it is, it finds the deadline gone and does nothing."""
        try:
            await act_on(command)
        except Exception as exc:
            if not poison.should_dead_letter(exc):
                raise
            key = command.lead_id.encode()
            raw = command.model_dump_json().encode()
            # The dead letter first: cancelled, then killed before it, the deadline was gone
            # without a trace (the cancellation's changelog write waits for it, as effects do).
            await poison.dead_letter(record, exc, raw=raw, key=key)
            if scheduler.pending(key).get(command.deadline) == command.due_ms:
                scheduler.cancel(key, command.deadline)
            hook = (dead_lettered_hooks or {}).get(command.deadline.split(":", 1)[0])
            if hook is not None:
                hook(key, command)

    @app.agent(deadlines_topic, name="deadlines")
    async def act_on_deadlines(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            fired = await decode_or_dead_letter(_fired.validate_json, event.message, dead_letters)
            if fired is None:
                continue
            commands = [fired] if isinstance(fired, DeadlineReached) else fired.deadlines
            for command in commands:
                await act_on_or_dead_letter(command, event.message)
