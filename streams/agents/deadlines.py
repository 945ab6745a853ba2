"""The timer that finds due deadlines and the agent that acts on them (see streams.timers)."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

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


@dataclass(frozen=True)
class Evidence:
    """What a failed deadline was to act on, dead-lettered in the deadline's place."""

    raw: bytes
    # The topic it was read from, where `flexoraa dead-letters replay` puts it back; None: the
    # deadlines topic (internal: a deadline replayed finds itself cancelled and does nothing).
    topic: str | None = None


def _nothing_held(key: bytes, fired: DeadlineReached) -> Evidence | None:
    return None


@dataclass(frozen=True)
class DeadLettered:
    """What a kind of deadline does when one of its own fails for a reason of its own and is
    dead-lettered and cancelled (streams.poison): left as they were, the state it acts on stayed
    held for good (a scheduled send, a recovery sequence) or set the failed deadline again.

    `evidence`: what the deadline was to act on, dead-lettered in its place so that nothing is
    dropped without a trace (None: the deadline itself). It only reads: it runs before the dead
    letter is sent, and a table change then would not wait for it.
    `settle`: leaves the kind's state consistent without the deadline, once the dead letter is
    sent and the deadline cancelled (its table changes wait for the dead letter)."""

    settle: Callable[[bytes, DeadlineReached], None]
    evidence: Callable[[bytes, DeadlineReached], Evidence | None] = _nothing_held


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
    dead_lettered: Mapping[str, DeadLettered] | None = None,
) -> None:
    source_name = source_topic.get_topic_name()
    actions = DeadlineActions(scheduler, sessions, handlers, poison, dead_lettered or {})

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

    @app.agent(deadlines_topic, name="deadlines")
    async def act_on_deadlines(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            fired = await decode_or_dead_letter(_fired.validate_json, event.message, dead_letters)
            if fired is None:
                continue
            commands = [fired] if isinstance(fired, DeadlineReached) else fired.deadlines
            for command in commands:
                await actions.act_on_or_dead_letter(command, event.message)


class DeadlineActions:
    """Acts on a fired deadline: its kind's handler, once, and a dead letter if it fails for a
    reason of its own."""

    def __init__(
        self,
        scheduler: Scheduler,
        sessions: Mapping[bytes, Any],
        handlers: Mapping[str, DeadlineHandler],
        poison: PoisonRecords,
        dead_lettered: Mapping[str, DeadLettered],
    ) -> None:
        self._scheduler = scheduler
        self._sessions = sessions
        self._handlers = handlers
        self._poison = poison
        self._dead_lettered = dead_lettered

    async def act_on(self, command: DeadlineReached) -> None:
        key = command.lead_id.encode()
        if self._scheduler.pending(key).get(command.deadline) != command.due_ms:
            return  # already fired, moved, or cancelled: firing is idempotent
        handler = self._handlers.get(_kind(command))
        if handler is None:
            logger.warning("no handler for deadline %s", command.deadline)
            self._scheduler.cancel(key, command.deadline)
            return
        DEADLINES_FIRED.labels(_kind(command)).inc()
        await while_unreachable(handler, key, command, self._sessions.get(key))
        # Cancelled after the handler's effects, so the changelog write waits for them: a
        # worker killed in between fires the deadline again (the effects' ids repeat) instead
        # of finding it gone and the leak never reported. A handler may have moved it.
        self._cancel_if_pending(key, command)

    async def act_on_or_dead_letter(self, command: DeadlineReached, record: SourceRecord) -> None:
        """`act_on`; a deadline whose handler fails for a reason of its own is dead-lettered
        alone (not its record's other deadlines) and cancelled: left pending, it would fire and
        fail again on every tick and after every restart (streams.poison). Its dead letter is
        for inspection: replayed as it is, it finds the deadline gone and does nothing."""
        try:
            await self.act_on(command)
        except Exception as exc:
            if not self._poison.should_dead_letter(exc):
                raise
            key = command.lead_id.encode()
            kind = self._dead_lettered.get(_kind(command))
            evidence = None
            if kind is not None:
                evidence = _unless_failing("evidence", kind.evidence, key, command)
            if evidence is None:
                evidence = Evidence(command.model_dump_json().encode())
            # The dead letter first: cancelled, then killed before it, the deadline was gone
            # without a trace (the cancellation's changelog write waits for it, as effects do).
            await self._poison.dead_letter(
                record, exc, raw=evidence.raw, key=key, source_topic=evidence.topic
            )
            self._cancel_if_pending(key, command)
            if kind is not None:
                _unless_failing("settle", kind.settle, key, command)

    def _cancel_if_pending(self, key: bytes, command: DeadlineReached) -> None:
        if self._scheduler.pending(key).get(command.deadline) == command.due_ms:
            self._scheduler.cancel(key, command.deadline)


T = TypeVar("T")


def _unless_failing(
    step: str, hook: Callable[[bytes, DeadlineReached], T], key: bytes, fired: DeadlineReached
) -> T | None:
    """A kind's hook, its failure logged: the state it meets may be what failed the deadline
    (a value no rule can use), and raising here would stop the worker at every restart, the
    deadline's other batch-mates unprocessed."""
    try:
        return hook(key, fired)
    except Exception:
        logger.exception("%s of dead-lettered deadline %s failed", step, fired.deadline)
        return None


def _kind(command: DeadlineReached) -> str:
    # "scheduled:<id>" deadlines share the handler of their kind.
    return command.deadline.split(":", 1)[0]
