"""The worker's producer publishes a round of held changelog writes in slices.

A round holds every table write made while the effects before them were being acknowledged:
after a backlog, 266,831 of them in the reads benchmark. Published in one go they held the
event loop, and every request to the worker, for seconds. Kept by the round until it ended, they
were freed in one go then, for 115-150 ms; let go of one by one, each is freed when Kafka has
acknowledged it, spread over the round.

Each test runs for both kinds of held write: the worker's tables hold serialised records
(`HeldWrite`, sent straight to aiokafka), and Faust's FutureMessages are held where its own
path is kept (transactions).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from typing import Any, cast

import pytest

from streams.producer import RELEASE_SLICE, HeldWrite, WorkerApp

WRITES = 4 * RELEASE_SLICE


class Changelog:
    """Keeps the keys it was given, not the writes (as the broker's acknowledgement does).

    Refuses its `fail_at`-th write (0-based), as a producer whose buffer is closed does, and
    signals once a first slice is out."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.published: list[bytes] = []
        self.fail_at = fail_at
        self.attempts = 0
        self.first_slice_published = asyncio.Event()

    def accept(self, key: bytes) -> None:
        self.attempts += 1
        if self.fail_at is not None and self.attempts == self.fail_at + 1:
            raise RuntimeError("producer closed")
        self.published.append(key)
        if len(self.published) == RELEASE_SLICE:
            self.first_slice_published.set()


class FaustChangelog:
    """Stands for Faust's changelog topic: what `release_held` uses of it."""

    def __init__(self, changelog: Changelog) -> None:
        self.changelog = changelog

    def get_topic_name(self) -> str:
        return "app-table-changelog"

    async def publish_message(self, fut: FaustWrite, wait: bool = False) -> None:
        self.changelog.accept(fut.message.key)


class FaustWrite:
    """Stands for Faust's FutureMessage: what `release_held` reads of it."""

    def __init__(self, channel: FaustChangelog, key: bytes) -> None:
        self.message = PendingMessage(channel, key)


class PendingMessage:
    def __init__(self, channel: FaustChangelog, key: bytes) -> None:
        self.channel = channel
        self.partition = 0
        self.key = key


class Kafka:
    """Stands for aiokafka's producer: what a round does with it."""

    def __init__(self, changelog: Changelog) -> None:
        self.changelog = changelog

    async def flush(self) -> None:
        pass

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes, partition: int
    ) -> asyncio.Future[Any]:
        self.changelog.accept(key)
        delivered = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered


Writer = Callable[[bytes], Any]


def producer_for(kind: str, changelog: Changelog) -> tuple[Any, Writer]:
    """A worker's producer, and a function that holds a write of a key in it (returns the
    write)."""
    app = WorkerApp(f"held-writes-{kind}", broker="kafka://127.0.0.1:1", autodiscover=False)
    producer = cast(Any, app.producer)
    if kind == "record":
        producer._producer = Kafka(changelog)

        def hold_record(key: bytes) -> HeldWrite:
            write = HeldWrite("app-table-changelog", 0, key, b"{}")
            producer.hold(write)
            return write

        return producer, hold_record
    channel = FaustChangelog(changelog)

    def send_soon(key: bytes) -> FaustWrite:
        write = FaustWrite(channel, key)
        producer.send_soon(write)
        return write

    return producer, send_soon


KINDS = pytest.mark.parametrize("kind", ["record", "future_message"])


@KINDS
async def test_a_large_round_is_published_in_order_in_slices_and_let_go_of_as_it_goes(
    kind: str,
) -> None:
    changelog = Changelog()
    producer, hold = producer_for(kind, changelog)
    keys = [f"lead-{i}".encode() for i in range(WRITES)]
    writes = [hold(key) for key in keys]
    # The same key written again goes to the end of the round, with its latest value.
    hold(keys[0])
    freed = [weakref.ref(write) for write in writes[1:]]
    del writes

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


@KINDS
async def test_a_failed_round_holds_its_unpublished_writes_again_before_the_newer_ones(
    kind: str,
) -> None:
    changelog = Changelog(fail_at=RELEASE_SLICE + 3)
    producer, hold = producer_for(kind, changelog)
    keys = [f"lead-{i}".encode() for i in range(WRITES)]
    for key in keys:
        hold(key)

    with pytest.raises(RuntimeError):
        await producer.release_held()
    assert changelog.published == keys[: RELEASE_SLICE + 3]

    # Written while the failed round's writes waited: one of its keys again, and a new key.
    rewritten = keys[-1]
    hold(rewritten)
    hold(b"lead-new")
    await producer.release_held()

    unpublished = keys[RELEASE_SLICE + 3 :]
    # Nothing dropped, nothing published twice, and a key's newer value is published last.
    assert changelog.published == [
        *keys[: RELEASE_SLICE + 3], *unpublished[:-1], rewritten, b"lead-new"
    ]  # fmt: skip


@KINDS
async def test_a_cancelled_round_holds_its_unpublished_writes_again(kind: str) -> None:
    changelog = Changelog()
    producer, hold = producer_for(kind, changelog)
    keys = [f"lead-{i}".encode() for i in range(WRITES)]
    for key in keys:
        hold(key)

    round_ = asyncio.create_task(producer.release_held())
    await changelog.first_slice_published.wait()
    round_.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await round_
    assert RELEASE_SLICE <= len(changelog.published) < WRITES

    await producer.release_held()
    assert changelog.published == keys
