"""SLA rules: minute sketches, rolling windows, targets, violations and daily reports.

Pure: no Kafka, database or web code; every time is an argument (epoch milliseconds, UTC).

Per (operation, tenant) the latencies of one minute are one DDSketch (relative accuracy 1 %,
mergeable) with call and error counts. A rolling P90/P99 over N minutes is the merge of the N
minute sketches, so it is as accurate as one sketch over all the values.
"""

from __future__ import annotations

import math
import struct
import uuid
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from ddsketch import DDSketch

from schemas.ids import name_based_id

# tenant_id of latency events that belong to no tenant (the event model needs a non-empty one):
# they count only towards the all-tenants aggregate.
from schemas.latency import NO_TENANT

RELATIVE_ACCURACY = 0.01
MINUTE_MS = 60_000
DAY_MS = 24 * 60 * MINUTE_MS
# tenant_key of the all-tenants aggregate (sla_metrics, sla_violations, sla_daily_reports).
PLATFORM = ""
OPERATIONS = ("ai_message", "verification", "routing", "outbound_send", "api_request")
WINDOWS_MIN = {"5m": 5, "1h": 60}
Metric = Literal["p90_ms", "error_rate", "uptime"]
_VIOLATION_NAMESPACE = uuid.UUID("5b0f6c1e-8d7a-4c39-a2e4-9f1d3b6c7a85")


# ----------------------------------------------------------------------------- sketches


def new_sketch() -> DDSketch:
    return DDSketch(relative_accuracy=RELATIVE_ACCURACY)


def _nonzero_bins(sketch: DDSketch) -> tuple[int, list[int]]:
    """(first key, counts) of the sketch's positive store, trimmed to its non-empty range."""
    store = sketch._store
    bins = store.bins
    first = next((i for i, count in enumerate(bins) if count), None)
    if first is None:
        return 0, []
    last = max(i for i, count in enumerate(bins) if count)
    # Every weight we add is 1, so counts are whole numbers; ints keep the JSON short.
    return store.offset + first, [round(count) for count in bins[first : last + 1]]


def _restore(first_key: int, counts: Iterable[int], zeros: int, total_ms: float,
             low_ms: float, high_ms: float) -> DDSketch:  # fmt: skip
    # ddsketch's own protobuf codec rebuilds a sketch the same way (store.add per bin); its
    # format drops sum, min and max, which the reports want, hence this encoding.
    sketch = new_sketch()
    count = zeros
    for offset, bin_count in enumerate(counts):
        if bin_count:
            sketch._store.add(first_key + offset, bin_count)
            count += bin_count
    sketch._zero_count = zeros
    sketch._count = count
    sketch._sum = total_ms
    if count:
        sketch._min, sketch._max = low_ms, high_ms
    return sketch


def sketch_to_state(sketch: DDSketch) -> dict[str, Any]:
    """A JSON-able form (Faust table values travel through a JSON changelog)."""
    first, counts = _nonzero_bins(sketch)
    state: dict[str, Any] = {"k": first, "b": counts, "z": round(sketch._zero_count)}
    if sketch.count:
        state.update(s=sketch.sum, lo=sketch._min, hi=sketch._max)
    return state


def sketch_from_state(state: Mapping[str, Any]) -> DDSketch:
    return _restore(
        state["k"], state["b"], state["z"], state.get("s", 0.0),
        state.get("lo", math.inf), state.get("hi", -math.inf),
    )  # fmt: skip


_HEADER = struct.Struct("<BdiIIddd")  # version, gamma, first key, bins, zeros, sum, min, max
_VERSION = 1


def sketch_to_bytes(sketch: DDSketch) -> bytes:
    """Compact binary form for `sla_metrics.sketch`: a header and uint32 bin counts."""
    first, counts = _nonzero_bins(sketch)
    header = _HEADER.pack(
        _VERSION, sketch._mapping.gamma, first, len(counts), round(sketch._zero_count),
        sketch.sum, sketch._min if sketch.count else 0.0, sketch._max if sketch.count else 0.0,
    )  # fmt: skip
    return header + array("I", counts).tobytes()


def sketch_from_bytes(data: bytes) -> DDSketch:
    version, gamma, first, size, zeros, total, low, high = _HEADER.unpack_from(data)
    if version != _VERSION:
        raise ValueError(f"unknown sketch encoding version {version}")
    if not math.isclose(gamma, new_sketch()._mapping.gamma):
        raise ValueError("sketch was built with another relative accuracy; cannot merge")
    counts = array("I")
    counts.frombytes(data[_HEADER.size : _HEADER.size + 4 * size])
    return _restore(first, counts, zeros, total, low, high)


def merge_sketches(sketches: Iterable[DDSketch]) -> DDSketch:
    merged = new_sketch()
    for sketch in sketches:
        if sketch.count:
            merged.merge(sketch)
    return merged


def quantile_ms(sketch: DDSketch, q: float) -> float | None:
    value = sketch.get_quantile_value(q) if sketch.count else None
    return None if value is None else float(value)


# ----------------------------------------------------------------------------- minute windows


def minute_of(ts_ms: int) -> int:
    return ts_ms - ts_ms % MINUTE_MS


def window_key(operation: str, tenant_key: str, minute_ms: int) -> str:
    return f"{operation}|{tenant_key}|{minute_ms}"


@dataclass
class MinuteWindow:
    """Calls, errors and a latency sketch of one operation and tenant in one minute."""

    operation: str
    tenant_key: str
    minute_ms: int
    partition: int
    calls: int = 0
    errors: int = 0
    sketch: DDSketch = field(default_factory=new_sketch)
    # Highest source offset applied: records of one operation come from one partition in
    # offset order, so a replay after a crash (same offsets) is recognised and skipped.
    last_offset: int = -1

    @property
    def key(self) -> str:
        return window_key(self.operation, self.tenant_key, self.minute_ms)

    def to_state(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "tenant_key": self.tenant_key,
            "minute_ms": self.minute_ms,
            "partition": self.partition,
            "calls": self.calls,
            "errors": self.errors,
            "last_offset": self.last_offset,
            "sketch": sketch_to_state(self.sketch),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MinuteWindow:
        return cls(
            operation=state["operation"],
            tenant_key=state["tenant_key"],
            minute_ms=state["minute_ms"],
            partition=state["partition"],
            calls=state["calls"],
            errors=state["errors"],
            sketch=sketch_from_state(state["sketch"]),
            last_offset=state["last_offset"],
        )


@dataclass(frozen=True, slots=True)
class Observation:
    operation: str
    tenant_id: str
    occurred_ms: int
    duration_ms: float
    error: bool
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one observation did: windows changed, windows expired, or why not."""

    changed: list[MinuteWindow]
    expired: list[str]
    dropped: Literal["late", "duplicate"] | None = None


class SlaWindows:
    """The minute windows a worker holds: the in-memory twin of the changelogged table.

    The watermark is per partition and follows event time (the latest event time seen, never
    ahead of the wall clock), so a worker replaying a backlog after downtime keeps the events
    instead of calling them late. An event is late when its minute ended more than the
    allowance before the watermark.
    """

    def __init__(self, *, lateness_ms: int, retention_min: int) -> None:
        self.lateness_ms = lateness_ms
        self.retention_ms = retention_min * MINUTE_MS
        self.windows: dict[str, MinuteWindow] = {}
        self.watermarks: dict[int, int] = {}

    def restore(self, states: Iterable[Mapping[str, Any]]) -> None:
        """The windows of the partitions held after a recovery. A window this worker kept
        through the rebalance may be newer than its saved copy (saved at most every second
        per key): the one that has read further is kept."""
        held, self.windows = self.windows, {}
        for state in states:
            window = MinuteWindow.from_state(state)
            current = held.get(window.key)
            if current is not None and current.last_offset > window.last_offset:
                window = current
            self.windows[window.key] = window
            mark = self.watermarks.get(window.partition, 0)
            self.watermarks[window.partition] = max(mark, window.minute_ms)

    def apply(self, obs: Observation, now_ms: int) -> Applied:
        previous = self.watermarks.get(obs.partition, 0)
        watermark = max(previous, min(obs.occurred_ms, now_ms))
        self.watermarks[obs.partition] = watermark
        minute = minute_of(obs.occurred_ms)
        if minute + MINUTE_MS + self.lateness_ms <= watermark:
            return Applied([], [], "late")
        tenant_keys = [PLATFORM] if obs.tenant_id == NO_TENANT else [PLATFORM, obs.tenant_id]
        changed = []
        for tenant_key in tenant_keys:
            key = window_key(obs.operation, tenant_key, minute)
            window = self.windows.get(key)
            if window is None:
                window = MinuteWindow(obs.operation, tenant_key, minute, obs.partition)
                self.windows[key] = window
            if obs.offset <= window.last_offset:
                # This window has it (windows are saved at different moments: after a crash
                # the tenant's may lack what the platform's has): the others may not.
                continue
            window.calls += 1
            window.errors += obs.error
            window.sketch.add(obs.duration_ms, 1)
            window.last_offset = obs.offset
            changed.append(window)
        if not changed:
            return Applied([], [], "duplicate")
        expired = []
        if minute_of(watermark) != minute_of(previous):
            expired = self._expire(obs.partition, watermark)
        return Applied(changed, expired)

    def _expire(self, partition: int, watermark_ms: int) -> list[str]:
        """Windows of this partition too old for any rolling window or late event."""
        horizon = minute_of(watermark_ms) - self.retention_ms - self.lateness_ms
        old = [
            key
            for key, window in self.windows.items()
            if window.partition == partition and window.minute_ms < horizon
        ]
        for key in old:
            del self.windows[key]
        return old

    def series(self) -> set[tuple[str, str]]:
        return {(w.operation, w.tenant_key) for w in self.windows.values()}

    def rolling(self, operation: str, tenant_key: str, now_ms: int, minutes: int) -> Rolling:
        """The last `minutes` minutes up to and including the one of `now_ms`."""
        last = minute_of(now_ms)
        # By key, a lookup per minute: scanning every window held for each series made a tick
        # quadratic in the tenants (16 s for 800 tenants, on the worker's event loop).
        found = (
            self.windows.get(window_key(operation, tenant_key, last - back * MINUTE_MS))
            for back in range(minutes)
        )
        return rolling(w for w in found if w is not None)


@dataclass(frozen=True, slots=True)
class Rolling:
    calls: int
    errors: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None


def summarise_rows(rows: Iterable[MinuteRow]) -> Rolling:
    """The rolling figures of persisted minute rows (their sketches merged)."""
    chosen = list(rows)
    return summarise(
        sum(r.calls for r in chosen),
        sum(r.errors for r in chosen),
        merge_sketches(r.sketch for r in chosen),
    )


def summarise(calls: int, errors: int, sketch: DDSketch) -> Rolling:
    return Rolling(
        calls=calls,
        errors=errors,
        p50_ms=quantile_ms(sketch, 0.5),
        p90_ms=quantile_ms(sketch, 0.9),
        p99_ms=quantile_ms(sketch, 0.99),
    )


def rolling(windows: Iterable[MinuteWindow]) -> Rolling:
    chosen = list(windows)
    return summarise(
        sum(w.calls for w in chosen),
        sum(w.errors for w in chosen),
        merge_sketches(w.sketch for w in chosen),
    )


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class Targets:
    """The SLA's targets; a value above its target is a breach."""

    p90_ms: Mapping[str, float]
    error_rate: float
    uptime: float
    min_calls: int


@dataclass(frozen=True, slots=True)
class Check:
    metric: Metric
    target: float
    # None: not enough calls in the window to judge either way.
    value: float | None
    breached: bool | None
    # The window's value even when too few calls judge it: enough to tell an open violation
    # has recovered (10 fast calls a night), never to open one.
    seen: float | None = None


def checks(targets: Targets, operation: str, window: Rolling) -> list[Check]:
    """The targets that apply to one operation, judged over one rolling window.

    An empty window counts as recovered (nothing is being served slowly); a window with fewer
    than `min_calls` calls is not judged, so one slow call among three cannot open a violation.
    """
    judged = window.calls >= targets.min_calls
    empty = window.calls == 0
    found = []
    p90_target = targets.p90_ms.get(operation)
    if p90_target is not None:
        value = window.p90_ms if judged else None
        seen = None if empty else window.p90_ms
        found.append(Check("p90_ms", p90_target, value, _breached(value, p90_target, empty), seen))
    value = window.error_rate if judged else None
    seen = None if empty else window.error_rate
    breached = _breached(value, targets.error_rate, empty)
    if breached and window.errors < MIN_ERRORS:
        # One error alone is no breach: from 20 calls against 0.1 %, any single error was a
        # violation, about hourly for a tenant meeting its SLA.
        breached = False
    found.append(Check("error_rate", targets.error_rate, value, breached, seen))
    return found


# Errors a window needs before its error rate can be over the target.
MIN_ERRORS = 2


def _breached(value: float | None, target: float, empty: bool) -> bool | None:
    if value is None:
        return False if empty else None
    return value > target


# ----------------------------------------------------------------------------- violations


@dataclass(frozen=True, slots=True)
class Violation:
    violation_id: str
    tenant_key: str
    operation: str
    metric: str
    target: float
    worst_value: float
    started_ms: int
    ended_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    kind: Literal["opened", "worsened", "closed"]
    violation: Violation


def violation_id(tenant_key: str, operation: str, metric: str, started_ms: int) -> str:
    """Deterministic, so re-evaluating the same breach after a restart is the same row."""
    return name_based_id(_VIOLATION_NAMESPACE, f"{tenant_key}|{operation}|{metric}|{started_ms}")


# An open violation closes once its value is this fraction of the target or less (or nothing is
# served). Closing at the target itself, a P90 hovering around it opened a new violation, and
# mailed the tenant's admins, on every other evaluation: 18 an hour in the review's run.
RECOVERY_FRACTION = 0.9


def step_violation(
    current: Violation | None,
    *,
    tenant_key: str,
    operation: str,
    check: Check,
    now_ms: int,
) -> tuple[Violation | None, Transition | None]:
    """The violation state after one evaluation: opens on a breach, keeps the worst value while
    open, closes on recovery (`RECOVERY_FRACTION` of the target, or an empty window); an
    undecided check (too few calls) changes nothing."""
    if check.breached is None:
        if (
            current is not None
            and check.seen is not None
            and check.seen <= check.target * RECOVERY_FRACTION
        ):
            # Too few calls to judge, but all of them well within the target: open till
            # morning, a violation of the evening's peak counted the whole night as breached.
            return None, Transition("closed", _replace(current, ended_ms=now_ms))
        return current, None
    if current is None:
        if not check.breached:
            return None, None
        assert check.value is not None
        opened = Violation(
            violation_id(tenant_key, operation, check.metric, now_ms),
            tenant_key, operation, check.metric, check.target, check.value, now_ms,
        )  # fmt: skip
        return opened, Transition("opened", opened)
    if check.breached:
        assert check.value is not None
        if check.value > current.worst_value:
            worse = _replace(current, worst_value=check.value)
            return worse, Transition("worsened", worse)
        return current, None
    if check.value is not None and check.value > check.target * RECOVERY_FRACTION:
        return current, None  # under the target, not yet clear of it
    return None, Transition("closed", _replace(current, ended_ms=now_ms))


def _replace(violation: Violation, **changes: Any) -> Violation:
    values = {name: getattr(violation, name) for name in Violation.__slots__}
    values.update(changes)
    return Violation(**values)


# ----------------------------------------------------------------------------- uptime


@dataclass(frozen=True, slots=True)
class Uptime:
    """Probe counts of one component over a period."""

    probes: int
    up: int
    downtime_s: float

    @property
    def ratio(self) -> float | None:
        return self.up / self.probes if self.probes else None


def uptime_check(targets: Targets, uptime: Uptime, period_s: float) -> Check:
    """Judges the downtime budget of a whole period (a month: 43.2 minutes at 99.9 %).

    The value is 1 - downtime / period length, so it only falls below the target once the
    period's budget is spent, not after one bad minute early in the month.
    """
    if not uptime.probes:
        return Check("uptime", targets.uptime, None, None)
    value = 1 - uptime.downtime_s / period_s
    return Check("uptime", targets.uptime, value, value < targets.uptime)


def step_uptime_violation(
    current: Violation | None, *, component: str, check: Check, now_ms: int
) -> tuple[Violation | None, Transition | None]:
    """Like `step_violation`, for a floor: the worst value is the lowest uptime."""
    if check.breached is None:
        return current, None
    if current is None:
        if not check.breached:
            return None, None
        assert check.value is not None
        opened = Violation(
            violation_id(PLATFORM, component, "uptime", now_ms),
            PLATFORM, component, "uptime", check.target, check.value, now_ms,
        )  # fmt: skip
        return opened, Transition("opened", opened)
    if check.breached:
        assert check.value is not None
        if check.value < current.worst_value:
            worse = _replace(current, worst_value=check.value)
            return worse, Transition("worsened", worse)
        return current, None
    return None, Transition("closed", _replace(current, ended_ms=now_ms))


# ----------------------------------------------------------------------------- daily reports


@dataclass(frozen=True, slots=True)
class MinuteRow:
    """One `sla_metrics` row."""

    operation: str
    tenant_key: str
    minute_ms: int
    calls: int
    errors: int
    sketch: DDSketch


def day_bounds_ms(day: date) -> tuple[int, int]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return int(start.timestamp() * 1000), int((start + timedelta(days=1)).timestamp() * 1000)


def month_bounds_ms(day: date) -> tuple[int, int]:
    start = datetime(day.year, day.month, 1, tzinfo=UTC)
    following = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp() * 1000), int(following.timestamp() * 1000)


def report_due(day: date, now_ms: int, lateness_ms: int, flush_ms: int) -> bool:
    """A day's report is built once late events can no longer change the day's minutes."""
    return now_ms >= day_bounds_ms(day)[1] + lateness_ms + flush_ms


def daily_reports(
    day: date,
    rows: Iterable[MinuteRow],
    violations: Iterable[Violation],
    uptime: Mapping[str, Uptime],
    targets: Targets,
) -> dict[str, dict[str, Any]]:
    """One report per tenant key seen that day, and always the all-tenants one ('')."""
    start_ms, end_ms = day_bounds_ms(day)
    per_series: dict[tuple[str, str], list[MinuteRow]] = {}
    for row in rows:
        if start_ms <= row.minute_ms < end_ms:
            per_series.setdefault((row.tenant_key, row.operation), []).append(row)
    in_day = [v for v in violations if v.started_ms < end_ms and (v.ended_ms or end_ms) > start_ms]
    tenants = {PLATFORM} | {t for t, _ in per_series} | {v.tenant_key for v in in_day}
    uptime_view = {
        component: {
            "ratio": u.ratio,
            "probes": u.probes,
            "downtime_s": round(u.downtime_s, 3),
            "met": None if u.ratio is None else u.ratio >= targets.uptime,
        }
        for component, u in sorted(uptime.items())
    }
    reports: dict[str, dict[str, Any]] = {}
    for tenant in sorted(tenants):
        operations = {}
        for (tenant_key, operation), series in sorted(per_series.items()):
            if tenant_key != tenant:
                continue
            summary = summarise(
                sum(r.calls for r in series),
                sum(r.errors for r in series),
                merge_sketches(r.sketch for r in series),
            )
            p90_target = targets.p90_ms.get(operation)
            operations[operation] = {
                "calls": summary.calls,
                "errors": summary.errors,
                "error_rate": summary.error_rate,
                "p50_ms": summary.p50_ms,
                "p90_ms": summary.p90_ms,
                "p99_ms": summary.p99_ms,
                "p90_target_ms": p90_target,
                "p90_met": None
                if p90_target is None or summary.p90_ms is None
                else summary.p90_ms <= p90_target,
                "error_rate_met": summary.error_rate is None
                or summary.error_rate <= targets.error_rate,
            }
        mine = [v for v in in_day if v.tenant_key == tenant]
        # Only the part of each violation inside the day counts towards the day's total.
        overlap_ms = sum(
            min(v.ended_ms or end_ms, end_ms) - max(v.started_ms, start_ms) for v in mine
        )
        reports[tenant] = {
            "day": day.isoformat(),
            "tenant_key": tenant,
            "operations": operations,
            "uptime": uptime_view,
            "violations": {
                "count": len(mine),
                "total_duration_s": overlap_ms / 1000,
                "items": [
                    {
                        "violation_id": v.violation_id,
                        "operation": v.operation,
                        "metric": v.metric,
                        "target": v.target,
                        "worst_value": v.worst_value,
                        "started_at": _iso(v.started_ms),
                        "ended_at": _iso(v.ended_ms) if v.ended_ms is not None else None,
                    }
                    for v in sorted(mine, key=lambda v: v.started_ms)
                ],
            },
        }
    return reports


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()
