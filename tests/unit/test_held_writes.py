"""The worker's producer publishes a round of held changelog writes in slices.

A round holds every table write made while the effects before them were being acknowledged:
after a backlog, 266,831 of them in the reads benchmark. Published in one go they held the
event loop, and every request to the worker, for seconds. Kept by the round until it ended, they
were freed in one go then, for 115-150 ms; let go of one by one, each is freed when Kafka has
acknowledged it, spread over the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any, cast

import pytest

from streams.producer import RELEASE_SLICE, WorkerApp

WRITES = 4 * RELEASE_SLICE


class Write:
    """Stands for Faust's FutureMessage: what `release_held` reads of it."""

    def __init__(self, channel: RecordingChangelog, key: bytes) -> None:
        self.message = Message(channel, key)


class Message:
    def __init__(self, channel: RecordingChangelog, key: bytes) -> None:
        self.channel = channel
        self.partition = 0
        self.key = key


class RecordingChangelog:
    """Keeps the keys it was given, not the messages (as the broker's acknowledgement does)."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish_message(self, fut: Write, wait: bool = False) -> None:
        self.published.append(fut.message.key)


async def test_a_large_round_is_published_in_order_in_slices_and_let_go_of_as_it_goes() -> None:
    app = WorkerApp("held-writes-test", broker="kafka://127.0.0.1:1", autodiscover=False)
    producer = cast(Any, app.producer)
    changelog = RecordingChangelog()
    keys = [f"lead-{i}".encode() for i in range(WRITES)]
    writes = [Write(changelog, key) for key in keys]
    for write in writes:
        producer.send_soon(write)
    rewrite = Write(changelog, keys[0])
    # The same key written again goes to the end of the round, with its latest value.
    producer.send_soon(rewrite)
    freed = [weakref.ref(write) for write in writes[1:]]
    del writes, write

    mid_round: list[tuple[int, int]] = []  # (published, of those freed)

    async def another_task() -> None:
        while True:
            published = len(changelog.published)
            mid_round.append((published, sum(ref() is None for ref in freed[:published])))
            await asyncio.sleep(0)

    other = asyncio.create_task(another_task())
    await asyncio.sleep(0)
    await producer.release_held()
    other.cancel()

    assert changelog.published == [*keys[1:], keys[0]]
    # The other task ran between slices, not only before and after the round, and by then
    # the round held none of the writes it had published but the one in hand.
    between = [(published, gone) for published, gone in mid_round if 0 < published < WRITES]
    assert between
    assert all(published - gone <= 1 for published, gone in between)


class FailingChangelog(RecordingChangelog):
    """Refuses its `fail_at`-th write (0-based), as a producer whose buffer is closed does."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.attempts = 0

    async def publish_message(self, fut: Write, wait: bool = False) -> None:
        self.attempts += 1
        if self.attempts == self.fail_at + 1:
            raise RuntimeError("producer closed")
        await super().publish_message(fut, wait)


async def test_a_failed_round_holds_its_unpublished_writes_again_before_the_newer_ones() -> None:
    app = WorkerApp("held-writes-failure-test", broker="kafka://127.0.0.1:1", autodiscover=False)
    producer = cast(Any, app.producer)
    changelog = FailingChangelog(fail_at=RELEASE_SLICE + 3)
    keys = [f"lead-{i}".encode() for i in range(WRITES)]
    for key in keys:
        producer.send_soon(Write(changelog, key))

    with pytest.raises(RuntimeError):
        await producer.release_held()
    assert changelog.published == keys[: RELEASE_SLICE + 3]

    # Written while the failed round's writes waited: one of its keys again, and a new key.
    rewritten = keys[-1]
    producer.send_soon(Write(changelog, rewritten))
    producer.send_soon(Write(changelog, b"lead-new"))
    await producer.release_held()

    unpublished = keys[RELEASE_SLICE + 3 :]
    # Nothing dropped, nothing published twice, and a key's newer value is published last.
    assert changelog.published == [
        *keys[: RELEASE_SLICE + 3], *unpublished[:-1], rewritten, b"lead-new"
    ]  # fmt: skip


class SliceSignallingChangelog(RecordingChangelog):
    def __init__(self) -> None:
        super().__init__()
        self.first_slice_published = asyncio.Event()

    async def publish_message(self, fut: Write, wait: bool = False) -> None:
        await super().publish_message(fut, wait)
        if len(self.published) == RELEASE_SLICE:
            self.first_slice_published.set()


async def test_a_cancelled_round_holds_its_unpublished_writes_again() -> None:
    app = WorkerApp("held-writes-cancel-test", broker="kafka://127.0.0.1:1", autodiscover=False)
    producer = cast(Any, app.producer)
    changelog = SliceSignallingChangelog()
    keys = [f"lead-{i}".encode() for i in range(WRITES)]
    for key in keys:
        producer.send_soon(Write(changelog, key))

    round_ = asyncio.create_task(producer.release_held())
    await changelog.first_slice_published.wait()
    round_.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await round_
    assert RELEASE_SLICE <= len(changelog.published) < WRITES

    await producer.release_held()
    assert changelog.published == keys
