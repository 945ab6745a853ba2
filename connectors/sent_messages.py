"""The outbound messages PostgreSQL has recorded (the sink's `messages` rows), found by the
channel's own id for them: a channel's later report names only that id."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True, slots=True)
class SentMessage:
    lead_id: str
    command_id: str
    text: str
    sent_by: str
    send_kind: str | None


class SentMessages:
    def __init__(self, pool_factory: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._pool_factory = pool_factory

    async def find(
        self, tenant_id: str, channel: str, channel_message_id: str
    ) -> SentMessage | None:
        """The accepted outbound message the channel knows as `channel_message_id`."""
        row = await (await self._pool_factory()).fetchrow(
            "SELECT lead_id::text, command_id::text, body, sent_by, send_kind FROM messages"
            " WHERE tenant_id = $1 AND channel = $2 AND direction = 'outbound'"
            " AND channel_message_id = $3",
            tenant_id, channel, channel_message_id,
        )  # fmt: skip
        if row is None or row["command_id"] is None:
            return None
        return SentMessage(row["lead_id"], row["command_id"], row["body"],
                           row["sent_by"] or "sdr", row["send_kind"])  # fmt: skip
