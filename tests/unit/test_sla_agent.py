"""The SLA agent's evaluator and uptime recorder when PostgreSQL is down: the gauges keep
coming from memory, and the probe minutes are stored once it is back."""

from __future__ import annotations

import contextlib
import math
import time
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from api.sla_gauges import SlaGauges, _publish
from flexoraa.settings import Settings
from streams.agents.sla import Evaluator, UnsavedWindows, UptimeRecorder
from streams.agents.sla_probes import Prober
from streams.agents.sla_store import SlaStore
from streams.rules.sla import (
    MINUTE_MS,
    PLATFORM,
    MinuteRow,
    MinuteWindow,
    Observation,
    SlaWindows,
    Transition,
    Uptime,
    Violation,
    minute_of,
    new_sketch,
)

T0 = int(datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp() * 1000)


class DownStore:
    """PostgreSQL unreachable for the first `down_calls` writes."""

    def __init__(self, down_calls: int = 10**9) -> None:
        self.down_calls = down_calls
        self.uptime: dict[int, dict[str, tuple[int, int]]] = {}

    def _maybe_down(self) -> None:
        if self.down_calls > 0:
            self.down_calls -= 1
            raise OSError("connection refused")

    async def upsert_minutes(self, windows: list[Any]) -> None:
        self._maybe_down()

    async def open_violations(self) -> list[Any]:
        return []

    async def record_uptime(
        self, prober_id: str, minute_ms: int, counts: dict[str, tuple[int, int]], interval: float
    ) -> None:
        self._maybe_down()
        self.uptime[minute_ms] = dict(counts)


class PostgresDown:
    async def probe(self) -> dict[str, bool]:
        return {"postgres": False, "kafka": True}


async def test_the_gauges_are_published_while_the_minutes_cannot_be_stored() -> None:
    windows = SlaWindows(lateness_ms=60_000, retention_min=61)
    for offset in range(30):
        windows.apply(Observation("routing", "t1", T0 + offset, 4_000.0, False, 0, offset), T0)
    evaluator = Evaluator(settings=Settings(), windows=windows,
                          store=cast(SlaStore, DownStore()), notify=lambda _: None)  # fmt: skip
    evaluator.dirty.update(windows.windows)
    await evaluator.run({0}, lambda operation: True, T0 + 1_000)
    p90 = REGISTRY.get_sample_value("flexoraa_sla_latency_p90_seconds",
                                    {"operation": "routing", "window": "5m"})  # fmt: skip
    assert p90 is not None
    assert 3.9 < p90 < 4.1
    assert evaluator.dirty  # kept for the run after PostgreSQL is back


async def test_minutes_probed_while_postgres_is_down_are_stored_once_it_is_back() -> None:
    # Each minute's counts were dropped at its end: 30 minutes down stored as 0 s of downtime.
    store = DownStore(down_calls=30)
    recorder = UptimeRecorder(settings=Settings(), prober=cast(Prober, PostgresDown()),
                              store=cast(SlaStore, store))  # fmt: skip
    for minute in range(31):
        await recorder.probe(T0 + minute * MINUTE_MS)
        with contextlib.suppress(OSError):
            await recorder.store(T0 + minute * MINUTE_MS)
    assert sorted(store.uptime) == [T0 + m * MINUTE_MS for m in range(31)]
    assert all(counts["postgres"] == (1, 0) for counts in store.uptime.values())


class BreachStore:
    """Kafka's month: within its budget, or down past it; and the uptime violations
    PostgreSQL holds."""

    def __init__(self) -> None:
        self.breached = False
        self.violations: list[Violation] = []

    async def uptime_between(self, start_ms: int, end_ms: int) -> dict[str, Uptime]:
        down_s = 10_000.0 if self.breached else 0.0
        return {"kafka": Uptime(probes=1000, up=1000 - int(down_s / 5), downtime_s=down_s)}

    async def open_violations(self) -> list[Violation]:
        return list(self.violations)

    async def save_transition(self, transition: Transition) -> bool:
        if transition.kind == "opened":
            self.violations.append(transition.violation)
        return True


async def test_a_leader_back_after_another_knows_the_violation_it_opened() -> None:
    # Read once per process: leading again, a worker opened (and alerted) the breach the
    # other leader had opened meanwhile, a second time.
    store = BreachStore()

    def recorder() -> UptimeRecorder:
        return UptimeRecorder(settings=Settings(), prober=cast(Prober, PostgresDown()),
                              store=cast(SlaStore, store))  # fmt: skip

    first, other = recorder(), recorder()
    await first.judge(T0, lambda _: None)  # leads while Kafka is within its budget
    first.step_down()
    store.breached = True
    await other.judge(T0 + 60_000, lambda _: None)  # the new leader opens the violation
    await first.judge(T0 + 120_000, lambda _: None)  # the first one leads again
    assert len(store.violations) == 1


def test_the_apis_gauges_of_an_operation_gone_quiet_show_nothing_not_its_last_figures() -> None:
    sketch = new_sketch()
    for _ in range(50):
        sketch.add(8_000.0)
    minute = T0 - T0 % MINUTE_MS
    _publish([MinuteRow("outbound_send", PLATFORM, minute, 50, 0, sketch)], minute)
    labels = {"operation": "outbound_send", "window": "1h"}
    assert REGISTRY.get_sample_value("flexoraa_sla_calls", labels) == 50
    _publish([], minute + 61 * MINUTE_MS)  # an hour later, nothing was sent
    assert REGISTRY.get_sample_value("flexoraa_sla_calls", labels) == 0
    p90 = REGISTRY.get_sample_value("flexoraa_sla_latency_p90_seconds", labels)
    assert p90 is not None
    assert math.isnan(p90)


class RowsThenDown:
    """The API's store: one minute of slow calls, then PostgreSQL unreachable."""

    def __init__(self, rows: list[MinuteRow]) -> None:
        self.rows: list[MinuteRow] | None = rows

    async def minute_rows(self, *args: Any, **kwargs: Any) -> list[MinuteRow]:
        if self.rows is None:
            raise OSError("connection refused")
        return self.rows


async def test_the_apis_gauges_show_empty_once_postgres_is_down_for_long() -> None:
    # Kept through a long outage, an hour-old 3 s P90 fired the alerts (the max of the API's
    # figures and the workers' live ones) till it ended.
    sketch = new_sketch()
    for _ in range(50):
        sketch.add(3_000.0)
    minute = minute_of(int(datetime.now(UTC).timestamp() * 1000))
    store = RowsThenDown([MinuteRow("ai_message", PLATFORM, minute, 50, 0, sketch)])
    gauges = SlaGauges(cast(SlaStore, store), refresh_s=0)
    labels = {"operation": "ai_message", "window": "5m"}
    await gauges.refresh()
    assert REGISTRY.get_sample_value("flexoraa_sla_latency_p90_seconds", labels) == pytest.approx(
        3.0, rel=0.02
    )
    store.rows = None
    await gauges.refresh()  # down for a moment: the figures stay
    assert REGISTRY.get_sample_value("flexoraa_sla_calls", labels) == 50
    gauges._read_at = time.monotonic() - 61  # down for over a minute
    await gauges.refresh()
    assert REGISTRY.get_sample_value("flexoraa_sla_calls", labels) == 0
    p90 = REGISTRY.get_sample_value("flexoraa_sla_latency_p90_seconds", labels)
    assert p90 is not None
    assert math.isnan(p90)


def _window(operation: str, partition: int, minute: int = 0) -> MinuteWindow:
    return MinuteWindow(operation, "t1", T0 + minute * MINUTE_MS, partition)


def test_a_window_is_saved_at_once_then_at_most_every_period() -> None:
    unsaved = UnsavedWindows(every_s=1.0)
    saved: list[MinuteWindow] = []
    window = _window("routing", 3)
    unsaved.add("routing", window)
    assert unsaved.save_due(10.0, saved.append, operation="routing") == 1
    unsaved.add("routing", window)
    assert unsaved.save_due(10.5, saved.append, operation="routing") == 0
    assert unsaved  # waits for the next period
    assert unsaved.save_due(11.0, saved.append) == 1
    assert saved == [window, window]
    assert not unsaved


def test_the_windows_of_partitions_leaving_the_worker_are_saved_at_once() -> None:
    # A window changed within a second of its last save waited for the next one; on a
    # rebalance or a stop its events were lost to the worker restoring it from the changelog.
    unsaved = UnsavedWindows(every_s=1.0)
    saved: list[MinuteWindow] = []
    leaving, staying = _window("routing", 3), _window("ai_reply", 5)
    for operation, window in (("routing", leaving), ("ai_reply", staying)):
        unsaved.add(operation, window)
        unsaved.save_due(10.0, saved.append, operation=operation)
        window.calls += 1
        unsaved.add(operation, window)
    saved.clear()
    assert unsaved.save_all(10.1, saved.append, {3}) == 1
    assert saved == [leaving]
    assert unsaved.save_all(10.2, saved.append, None) == 1
    assert saved == [leaving, staying]
    assert not unsaved


def test_expired_and_moved_windows_are_not_saved() -> None:
    unsaved = UnsavedWindows(every_s=1.0)
    saved: list[MinuteWindow] = []
    expired, moved, kept = (
        _window("routing", 1, 0),
        _window("routing", 2, 1),
        _window("routing", 1, 2),
    )
    for window in (expired, moved, kept):
        unsaved.add("routing", window)
    unsaved.forget("routing", expired.key)
    unsaved.keep(lambda window: window.partition == 1)
    assert unsaved.save_all(10.0, saved.append, None) == 1
    assert saved == [kept]
