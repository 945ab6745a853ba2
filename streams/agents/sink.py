"""The sink agent: inbound messages to PostgreSQL in batches."""

from __future__ import annotations

from faust.types import AppT, StreamT, TopicT
from pydantic import ValidationError

from schemas.events import InboundMessage
from streams.dead_letters import send_dead_letter
from streams.sink import InboundMessageSink


def register(
    app: AppT,
    *,
    inbound: TopicT,
    dead_letters: TopicT,
    sink: InboundMessageSink,
    batch_size: int,
    batch_window_s: float,
) -> None:
    @app.agent(inbound, name="postgres-sink")
    async def write_inbound_messages(stream: StreamT[bytes]) -> None:
        async for values in stream.take(batch_size, within=batch_window_s):
            batch = []
            for value in values:
                try:
                    batch.append(InboundMessage.model_validate_json(value))
                except ValidationError:
                    continue  # the sessions agent dead-letters it; one letter per record
            for rejected in await sink.write(batch):
                await send_dead_letter(
                    dead_letters,
                    source_topic=inbound.get_topic_name(),
                    partition=None,
                    offset=None,
                    key=rejected.message.lead_id.encode(),
                    raw=rejected.message.model_dump_json().encode(),
                    reason=rejected.reason,
                    kind="sink_rejected",
                )
