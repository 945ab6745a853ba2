"""The worker's producer publishes a round of held changelog writes in slices.

A round holds every table write made while the effects before them were being acknowledged:
after a backlog, 266,831 of them in the reads benchmark. Published in one go they held the
event loop, and every request to the worker, for seconds.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from streams.producer import RELEASE_SLICE, WorkerApp

WRITES = 4 * RELEASE_SLICE


class RecordingChangelog:
    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish_message(self, fut: Any, wait: bool = False) -> None:
        self.published.append(fut.message.key)


async def test_a_large_round_lets_other_tasks_run_and_keeps_the_order_of_writes() -> None:
    app = WorkerApp("held-writes-test", broker="kafka://127.0.0.1:1", autodiscover=False)
    producer = cast(Any, app.producer)
    changelog = RecordingChangelog()
    keys = [f"lead-{i}".encode() for i in range(WRITES)]
    for key in keys:
        producer.send_soon(SimpleNamespace(
            message=SimpleNamespace(channel=changelog, partition=0, key=key)
        ))  # fmt: skip
    # The same key written again goes to the end of the round, with its latest value.
    producer.send_soon(SimpleNamespace(
        message=SimpleNamespace(channel=changelog, partition=0, key=keys[0])
    ))  # fmt: skip

    seen_mid_round: list[int] = []

    async def another_task() -> None:
        while True:
            seen_mid_round.append(len(changelog.published))
            await asyncio.sleep(0)

    other = asyncio.create_task(another_task())
    await asyncio.sleep(0)
    await producer.release_held()
    other.cancel()

    assert changelog.published == [*keys[1:], keys[0]]
    # The other task ran between slices, not only before and after the round.
    assert any(0 < published < WRITES for published in seen_mid_round)
