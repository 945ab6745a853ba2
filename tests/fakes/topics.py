"""A topic that records what is sent to it, for unit tests of agents' effects."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecordingTopic:
    sent: list[bytes] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append(value)
