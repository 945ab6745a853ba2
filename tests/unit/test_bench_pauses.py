"""The benches read each process's pauses from its /metrics page (bench.common.pauses_in)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from bench.common import pauses_between, pauses_in


def _page(young: list[float], full: list[float], lags: list[float], blocked_s: float) -> str:
    """A /metrics page as flexoraa.runtime and the worker's producer write it."""
    registry = CollectorRegistry()
    gc_pause = Histogram("flexoraa_gc_pause_seconds", "", ["generation"], registry=registry)
    for seconds in young:
        gc_pause.labels("0").observe(seconds)
    for seconds in full:
        gc_pause.labels("2").observe(seconds)
    lag = Histogram(
        "flexoraa_event_loop_lag_seconds", "", buckets=(0.01, 0.025, 0.1), registry=registry
    )
    for seconds in lags:
        lag.observe(seconds)
    Counter("flexoraa_producer_blocked_seconds", "", registry=registry).inc(blocked_s)
    return generate_latest(registry).decode()


def test_pauses_between_two_pages() -> None:
    before = pauses_in(_page(young=[0.002], full=[], lags=[0.001], blocked_s=0.5))
    after = pauses_in(
        _page(
            young=[0.002, 0.010, 0.020],
            full=[0.060],
            lags=[0.001, 0.005, 0.030, 0.090],
            blocked_s=0.75,
        )
    )
    paused = pauses_between(before, after)
    assert paused["gc_ms"] == 90.0  # 10 + 20 + 60 ms collected in between
    assert paused["gc_mean_ms"] == 30.0  # over three collections, of any generation
    assert paused["gc_gen2"] == 1
    assert paused["loop_lag_over_25ms"] == 2
    assert paused["producer_blocked_ms"] == 250.0


def test_no_collection_in_between_is_a_zero_mean() -> None:
    page = pauses_in(_page(young=[0.004], full=[], lags=[], blocked_s=0))
    assert pauses_between(page, page)["gc_mean_ms"] == 0.0
