"""Process-level pauses that show up as tail latency: garbage collections and event-loop lag.

Both processes (API and worker) export them, so a p99 that jumps can be told apart from a slow
query or a slow broker: a long `flexoraa_gc_pause_seconds` or a `flexoraa_event_loop_lag_seconds`
sample means every request in flight at that moment waited, whatever it was doing.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from prometheus_client import Histogram

GC_PAUSE = Histogram(
    "flexoraa_gc_pause_seconds",
    "Time the interpreter spent in one garbage collection, by generation",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
LOOP_LAG = Histogram(
    "flexoraa_event_loop_lag_seconds",
    "How late the event loop ran a callback scheduled for a fixed moment",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
# Children made once, here: `labels()` takes the family's lock, which a /metrics scrape holds while
# it collects, and a collection can start inside that scrape; the callback must only `observe`.
# Made at import, they are also exported at zero from the start.
_GC_PAUSE_BY_GENERATION = {generation: GC_PAUSE.labels(str(generation)) for generation in range(3)}

_gc_started: float | None = None


def _time_collection(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    elif _gc_started is not None:
        _GC_PAUSE_BY_GENERATION[info["generation"]].observe(time.perf_counter() - _gc_started)
        _gc_started = None


def settle_collector(gen0_threshold: int) -> None:
    """For a long-running process, once its modules and services exist: those live as long as
    the process, so they leave the collector's generations (a full collection then scans only
    what was made since), and young collections run every `gen0_threshold` allocations.

    A busy worker allocates thousands of short-lived objects per message (futures, records,
    dicts); at Python's default of 700 it ran a young collection every few messages, and
    collecting took 4 % of its CPU (bench.throughput). Older generations keep their defaults.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def time_garbage_collections() -> None:
    """Observes every collection's duration (idempotent: one callback per process)."""
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)


async def watch_loop_lag(interval_s: float = 0.1) -> None:
    """Runs until cancelled: sleeps `interval_s` and records how much later than that it woke."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        LOOP_LAG.observe(max(0.0, loop.time() - expected))
