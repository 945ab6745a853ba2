"""The pause metrics both processes export: garbage collections and event-loop lag."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

from prometheus_client import REGISTRY

from flexoraa.runtime import settle_collector, time_garbage_collections, watch_loop_lag


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_full_collection_is_timed_once() -> None:
    time_garbage_collections()
    time_garbage_collections()  # a second call must not count collections twice
    before = _value("flexoraa_gc_pause_seconds_count", generation="2")
    gc.collect()
    assert _value("flexoraa_gc_pause_seconds_count", generation="2") == before + 1


async def test_a_blocked_loop_is_observed_as_lag() -> None:
    def slow_buckets() -> float:
        total = _value("flexoraa_event_loop_lag_seconds_count")
        return total - _value("flexoraa_event_loop_lag_seconds_bucket", le="0.1")

    before = slow_buckets()
    watcher = asyncio.create_task(watch_loop_lag(interval_s=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # noqa: ASYNC251 (the point: a callback that holds the loop)
    await asyncio.sleep(0.05)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert slow_buckets() >= before + 1


def test_a_settled_collector_keeps_what_exists_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    long_lived = [{"state": i} for i in range(1000)]
    try:
        settle_collector(20_000)
        assert gc.get_threshold() == (20_000, before[1], before[2])
        # What existed was moved out of the generations a collection scans.
        assert gc.get_freeze_count() >= len(long_lived)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
