"""Sink agents: a topic's events to PostgreSQL in batches, idempotently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from faust.types import TopicT
from pydantic import ValidationError

from schemas.events import Event
from streams.batches import BatchLane, SourceRecord
from streams.dead_letters import (
    dead_letter_record,
    describe_validation_error,
    for_replay_to,
    send_dead_letter,
)
from streams.sink import BatchSink

E = TypeVar("E", bound=Event)


class SinkSpec(Generic[E]):
    """What one sink agent reads and how it writes."""

    def __init__(
        self,
        name: str,
        topic: TopicT,
        model: type[E],
        sink: BatchSink[E],
        *,
        dead_letter_invalid: bool = True,
    ) -> None:
        self.name = name
        self.topic = topic
        self.model = model
        self.sink = sink
        # Off where another agent of the same topic already dead-letters undecodable records.
        self.dead_letter_invalid = dead_letter_invalid

    async def write(self, records: Sequence[SourceRecord], dead_letters: TopicT) -> None:
        batch = []
        for record in records:
            try:
                batch.append(self.model.model_validate_json(record.value))
            except ValidationError as exc:
                if self.dead_letter_invalid:
                    await dead_letter_record(
                        dead_letters, record, describe_validation_error(exc), "invalid_event"
                    )
        for rejected in await self.sink.write(batch):
            # Token usage has a lead only when an AI action on a lead spent it.
            key = getattr(rejected.message, "lead_id", None) or rejected.message.tenant_id
            await send_dead_letter(
                dead_letters,
                source_topic=self.topic.get_topic_name(),
                partition=None,
                offset=None,
                key=key.encode(),
                raw=rejected.message.model_dump_json().encode(),
                reason=rejected.reason,
                kind=rejected.kind,
                consumer=for_replay_to(rejected.kind),
            )


def register(
    lane: BatchLane,
    spec: SinkSpec[E],
    *,
    dead_letters: TopicT,
    batch_size: int,
    batch_window_s: float,
) -> None:
    """The sink as a batch lane handler: its topic's fetches, whole (streams.batches), not a
    record at a time through Faust's streams, and those that arrive within `batch_window_s`
    written together: one transaction for a steady load's few records per fetch cost a
    sixth of a worker's CPU at 500 messages/s."""

    async def write_fetched(records: Sequence[SourceRecord]) -> None:
        await spec.write(records, dead_letters)

    lane.add_handler(
        f"sink-{spec.name}",
        [spec.topic],
        write_fetched,
        max_batch=batch_size,
        linger_s=batch_window_s,
    )
