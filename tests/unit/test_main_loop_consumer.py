"""The worker's Kafka consumer runs on the worker's own event loop, not in a thread of its own."""

from __future__ import annotations

import asyncio
import threading

import faust
import pytest

from streams.producer import MainLoopConsumerThread


def _where() -> tuple[int, asyncio.AbstractEventLoop]:
    return threading.get_ident(), asyncio.get_running_loop()


async def _where_async() -> tuple[int, asyncio.AbstractEventLoop]:
    return _where()


async def test_calls_to_the_consumer_run_where_they_are_made(worker_app: faust.App) -> None:
    thread = worker_app.consumer._thread  # type: ignore[attr-defined]
    assert isinstance(thread, MainLoopConsumerThread)
    here = (threading.get_ident(), asyncio.get_running_loop())
    # Faust's thread would queue these for a loop that is not running here: they would hang.
    assert await asyncio.wait_for(thread.call_thread(_where_async), 1) == here
    assert await asyncio.wait_for(thread.call_thread(_where), 1) == here


async def test_a_rebalance_reaches_the_consumer_directly(
    worker_app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = worker_app.consumer
    thread = consumer._thread  # type: ignore[attr-defined]
    calls: list[tuple[str, object]] = []

    async def revoked(tps: set[object]) -> None:
        calls.append(("revoked", tps))

    async def assigned(tps: set[object], generation_id: int = 0) -> None:
        calls.append(("assigned", (tps, generation_id)))

    monkeypatch.setattr(consumer, "on_partitions_revoked", revoked)
    monkeypatch.setattr(consumer, "on_partitions_assigned", assigned)
    await asyncio.wait_for(thread.on_partitions_revoked({"a"}), 1)
    await asyncio.wait_for(thread.on_partitions_assigned({"b"}, 7), 1)
    assert calls == [("revoked", {"a"}), ("assigned", ({"b"}, 7))]


def fresh_thread(worker_app: faust.App) -> MainLoopConsumerThread:
    return MainLoopConsumerThread(worker_app.consumer, loop=asyncio.get_running_loop())


class _Fetcher:
    closed = False

    async def close(self) -> None:
        self.closed = True


class _ClosedConsumer:
    """An aiokafka consumer that Faust's close() marked closed: its stop() does nothing."""

    _closed = True

    def __init__(self) -> None:
        self._fetcher = _Fetcher()

    async def stop(self) -> None:
        return None


async def test_a_consumer_closed_by_faust_still_has_its_fetcher_stopped(
    worker_app: faust.App,
) -> None:
    thread = fresh_thread(worker_app)
    consumer = _ClosedConsumer()
    thread._consumer = consumer
    await thread.on_thread_stop()
    assert consumer._fetcher.closed


async def test_stopping_is_bounded_by_the_shutdown_timeout(
    worker_app: faust.App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    thread = fresh_thread(worker_app)

    async def never_stops() -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(thread, "_shutdown_thread", never_stops)
    thread.shutdown_timeout = 0.05
    thread._started.set()
    await asyncio.wait_for(thread.stop(), 5)
    assert "did not stop within" in caplog.text
