"""SLA monitoring: the latency agent, the evaluation timer, the prober and the daily report.

* The agent counts each latency event into its minute window (`streams.rules.sla`) and writes
  the window to the `sla_windows` table, whose changelog makes the windows survive restarts.
  The latency topic is keyed by operation, so one worker owns all of an operation's windows.
* Every `SLA_EVALUATE_INTERVAL_S` each worker stores the changed minutes of the operations it
  owns in `sla_metrics`, sets the P90/error gauges, and steps the violation state machine
  (opened → a `Notification` for the tenant's admins; closed → `ended_at`).
* On the leader only: the uptime prober every `SLA_PROBE_INTERVAL_S`, and the daily report of
  yesterday once it is due (00:00 UTC plus the lateness allowance), idempotent per day.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from faust.types import AppT, TableT, TopicT

from flexoraa.db import DB_ERRORS
from flexoraa.kafka import EventPublisher, partition_of
from flexoraa.settings import Settings
from schemas.ids import name_based_id
from schemas.latency import LatencyEvent
from schemas.notifications import Notification
from streams.agents.sla_metrics import (
    LATENCY_EVENTS,
    OPERATION_DURATION,
    SLA_CALLS,
    SLA_COMPONENT_UP,
    SLA_DOWNTIME,
    SLA_DROPPED_EVENTS,
    SLA_ERROR_RATIO,
    SLA_MIN_CALLS,
    SLA_OPEN_VIOLATIONS,
    SLA_P90,
    SLA_P99,
    SLA_PROBES,
    SLA_REPORTS,
    SLA_TARGET_ERROR_RATIO,
    SLA_TARGET_P90,
    SLA_TARGET_UPTIME,
    SLA_UPTIME_RATIO,
    publish_rolling,
)
from streams.agents.sla_probes import Prober
from streams.agents.sla_store import PoolFactory, SlaStore
from streams.batches import BatchLane, SourceRecord
from streams.dead_letters import dead_letter_record, decode_or_dead_letter
from streams.producer import AcknowledgedOnlyConsumer, put_in_partition
from streams.rules.sla import (
    PLATFORM,
    WINDOWS_MIN,
    Check,
    MinuteWindow,
    Observation,
    SlaWindows,
    Targets,
    Transition,
    Violation,
    checks,
    daily_reports,
    day_bounds_ms,
    minute_of,
    month_bounds_ms,
    report_due,
    step_uptime_violation,
    step_violation,
    uptime_check,
)

logger = logging.getLogger(__name__)
PERSIST_EVERY_S = 1.0
_NOTIFICATION_NAMESPACE = uuid.UUID("0f3a9e57-2b6d-4c1e-8f40-7d2c5a9b1e63")
_REPORT_CHECK_S = 30.0
# PostgreSQL unreachable or refusing: the timer tries again on its next tick.
_UNAVAILABLE = DB_ERRORS
_UNAVAILABLE_OR_HUNG: tuple[type[BaseException], ...] = (*DB_ERRORS, TimeoutError)
# Probe minutes kept while PostgreSQL cannot store them: a day (about 1,440 small dicts).
UNSTORED_MINUTES_KEPT = 24 * 60

ViolationKey = tuple[str, str, str]  # tenant_key, operation, metric


def targets_from(settings: Settings) -> Targets:
    return Targets(
        p90_ms={
            "ai_message": settings.sla_target_ai_message_p90_ms,
            "verification": settings.sla_target_verification_p90_ms,
            "routing": settings.sla_target_routing_p90_ms,
        },
        error_rate=settings.sla_target_error_rate,
        uptime=settings.sla_target_uptime,
        min_calls=settings.sla_min_calls,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def violation_notification(violation: Violation, tenant_id: str) -> Notification:
    """The alert for a violation that just opened (its id makes a re-send a duplicate)."""
    if violation.metric == "p90_ms":
        what = f"{violation.operation} P90 is {violation.worst_value:.0f} ms"
        target = f"target below {violation.target:.0f} ms"
    elif violation.metric == "error_rate":
        what = f"{violation.operation} error rate is {violation.worst_value:.2%}"
        target = f"target below {violation.target:.2%}"
    else:
        what = f"{violation.operation} uptime this month is {violation.worst_value:.3%}"
        target = f"target {violation.target:.1%}"
    scope = "all tenants" if violation.tenant_key == PLATFORM else "your account"
    return Notification(
        event_id=name_based_id(_NOTIFICATION_NAMESPACE, violation.violation_id),
        tenant_id=tenant_id,
        occurred_at=datetime.fromtimestamp(violation.started_ms / 1000, tz=UTC),
        audience="admins",
        category="sla_violation",
        title=f"SLA violation: {what}"[:200],
        body=f"{what} ({target}) for {scope} since "
        f"{datetime.fromtimestamp(violation.started_ms / 1000, tz=UTC):%Y-%m-%d %H:%M} UTC. "
        "You will not be alerted again while it lasts.",
        data={
            "violation_id": violation.violation_id,
            "operation": violation.operation,
            "metric": violation.metric,
            "target": violation.target,
            "value": violation.worst_value,
            "tenant_key": violation.tenant_key,
        },
    )


class Evaluator:
    """Steps the violations of the series this worker owns and publishes the gauges."""

    def __init__(
        self,
        *,
        settings: Settings,
        windows: SlaWindows,
        store: SlaStore,
        notify: Callable[[Notification], Any],
    ) -> None:
        self._settings = settings
        self._targets = targets_from(settings)
        self._windows = windows
        self._store = store
        self._notify = notify
        self.open: dict[ViolationKey, Violation] = {}
        self._loaded_for: frozenset[int] | None = None
        self.dirty: set[str] = set()
        self._gauged: set[str] = set()

    def invalidate(self) -> None:
        """After a rebalance: the open violations are re-read for the new set of partitions."""
        self._loaded_for = None

    async def run(self, owned: set[int], owns: Callable[[str], bool], now_ms: int) -> None:
        # The gauges come from the windows in memory: published whatever PostgreSQL does, or
        # every P90 and error alert went blind (frozen values) exactly while it was down.
        try:
            await self._judge(owned, owns, now_ms)
        finally:
            self._publish_gauges(owns, now_ms)

    async def _judge(self, owned: set[int], owns: Callable[[str], bool], now_ms: int) -> None:
        try:
            await self._store_minutes(owns)
        except _UNAVAILABLE as exc:
            # Kept dirty for the next run; the violations below may still be judged.
            logger.warning("SLA minutes not stored yet: %r", exc)
        if self._loaded_for != frozenset(owned):
            self.open = {
                (v.tenant_key, v.operation, v.metric): v
                for v in await self._store.open_violations()
                if v.metric != "uptime" and owns(v.operation)
            }
            self._loaded_for = frozenset(owned)
        series = {s for s in self._windows.series() if owns(s[0])}
        series |= {(op, tenant) for tenant, op, _ in self.open}
        window_min = self._settings.sla_violation_window_min
        for operation, tenant_key in sorted(series):
            judged = self._windows.rolling(operation, tenant_key, now_ms, window_min)
            for check in checks(self._targets, operation, judged):
                key = (tenant_key, operation, check.metric)
                await self._step(key, check, now_ms)

    async def _store_minutes(self, owns: Callable[[str], bool]) -> None:
        keys = [k for k in self.dirty if k in self._windows.windows]
        changed = [self._windows.windows[k] for k in keys]
        changed = [w for w in changed if owns(w.operation)]
        # Cleared before the write, not after: an event the agent counts while the write is in
        # flight marks its window dirty again, and the next run stores it. Clearing afterwards
        # lost that mark, and a minute's last events never reached sla_metrics.
        self.dirty.difference_update(keys)
        try:
            await self._store.upsert_minutes(changed)
        except BaseException:
            # Only windows still kept: one the retention dropped meanwhile is gone for good.
            self.dirty.update(k for k in keys if k in self._windows.windows)
            raise

    async def _step(self, key: ViolationKey, check: Check, now_ms: int) -> None:
        tenant_key, operation, _ = key
        state, transition = step_violation(
            self.open.get(key), tenant_key=tenant_key, operation=operation, check=check,
            now_ms=now_ms,
        )  # fmt: skip
        if transition is not None:
            await self._apply(transition)
        if state is None:
            self.open.pop(key, None)
        else:
            self.open[key] = state

    async def _apply(self, transition: Transition) -> None:
        applied = await self._store.save_transition(transition)
        violation = transition.violation
        logger.info(
            "SLA violation %s: %s %s %s (worst %s, target %s)", transition.kind,
            violation.tenant_key or "<all tenants>", violation.operation, violation.metric,
            violation.worst_value, violation.target,
        )  # fmt: skip
        if transition.kind != "opened" or not applied:
            return  # alert once, when it opens; never while it stays open
        tenant_id = violation.tenant_key or self._settings.sla_alert_tenant_id
        if tenant_id:
            await self._notify(violation_notification(violation, tenant_id))

    def _publish_gauges(self, owns: Callable[[str], bool], now_ms: int) -> None:
        operations = {op for op, tenant in self._windows.series() if tenant == PLATFORM}
        operations = {op for op in operations if owns(op)}
        for operation in operations:
            for name, minutes in WINDOWS_MIN.items():
                summary = self._windows.rolling(operation, PLATFORM, now_ms, minutes)
                publish_rolling(operation, name, summary)
        # An operation whose partition moved to another worker is that worker's to report.
        for operation in self._gauged - operations:
            for name in WINDOWS_MIN:
                for gauge in (SLA_CALLS, SLA_P90, SLA_P99, SLA_ERROR_RATIO):
                    with contextlib.suppress(KeyError):
                        gauge.remove(operation, name)
        self._gauged = operations
        counts: dict[tuple[str, str], int] = {}
        for _, operation, metric in self.open:
            counts[(operation, metric)] = counts.get((operation, metric), 0) + 1
        SLA_OPEN_VIOLATIONS.clear()
        for (operation, metric), count in counts.items():
            SLA_OPEN_VIOLATIONS.labels(operation, metric).set(count)


class UptimeRecorder:
    """The leader's probe rounds, summed per minute and written as absolute counts."""

    def __init__(self, *, settings: Settings, prober: Prober, store: SlaStore) -> None:
        self._settings = settings
        self._prober = prober
        self._store = store
        self._targets = targets_from(settings)
        self.prober_id = str(uuid.uuid4())
        # Each minute's counts, kept until stored: while PostgreSQL is down its own probes
        # fail, and a minute dropped at its end (as it was) left an outage of the database
        # out of the downtime (30 minutes down stored as 0 s).
        self._minutes: dict[int, dict[str, tuple[int, int]]] = {}
        self._last_ratios_ms = 0
        self.open: dict[str, Violation] | None = None

    async def probe(self, now_ms: int) -> dict[str, bool]:
        results = await self._prober.probe()
        minute = minute_of(now_ms)
        counts = self._minutes.setdefault(minute, {})
        for component, up in results.items():
            probes, ups = counts.get(component, (0, 0))
            counts[component] = (probes + 1, ups + up)
            SLA_COMPONENT_UP.labels(component).set(1 if up else 0)
            SLA_PROBES.labels(component, "up" if up else "down").inc()
        for old in sorted(self._minutes)[:-UNSTORED_MINUTES_KEPT]:
            logger.warning("uptime of minute %d dropped: not stored for a day", old)
            del self._minutes[old]
        return results

    async def store(self, now_ms: int) -> None:
        """The minutes probed and not stored yet, oldest first; a past minute is let go once
        stored, the current one stays to count."""
        minute = minute_of(now_ms)
        for stored in sorted(self._minutes):
            await self._store.record_uptime(
                self.prober_id, stored, self._minutes[stored], self._settings.sla_probe_interval_s
            )
            if stored != minute:
                del self._minutes[stored]

    def step_down(self) -> None:
        """No longer the leader: the open violations are read again from PostgreSQL when it
        leads again. Kept, one the other leader opened meanwhile was unknown here, and this
        worker opened it, and alerted it, a second time."""
        self.open = None

    async def judge(self, now_ms: int, notify: Callable[[Notification], Any]) -> None:
        """Uptime so far today and this month (gauges) and the monthly budget (violations)."""
        if now_ms - self._last_ratios_ms < 15_000:
            return  # two cheap queries, but not every probe round
        self._last_ratios_ms = now_ms
        today = datetime.fromtimestamp(now_ms / 1000, tz=UTC).date()
        day_start, _ = day_bounds_ms(today)
        month_start, month_end = month_bounds_ms(today)
        for period, start in (("day", day_start), ("month", month_start)):
            for component, uptime in (await self._store.uptime_between(start, now_ms)).items():
                ratio = uptime.ratio
                SLA_UPTIME_RATIO.labels(component, period).set(math.nan if ratio is None else ratio)
                SLA_DOWNTIME.labels(component, period).set(uptime.downtime_s)
        month = await self._store.uptime_between(month_start, now_ms)
        if self.open is None:
            self.open = {
                v.operation: v for v in await self._store.open_violations() if v.metric == "uptime"
            }
        # This round's own: `step_down` may drop the attribute while the round awaits.
        open_now = self.open
        for component, uptime in month.items():
            check = uptime_check(self._targets, uptime, (month_end - month_start) / 1000)
            state, transition = step_uptime_violation(
                open_now.get(component), component=component, check=check, now_ms=now_ms
            )
            if transition is not None:
                applied = await self._store.save_transition(transition)
                alert_to = self._settings.sla_alert_tenant_id
                if transition.kind == "opened" and applied and alert_to:
                    await notify(violation_notification(transition.violation, alert_to))
            if state is None:
                open_now.pop(component, None)
            else:
                open_now[component] = state
        # A month's budget starts afresh: last month's uptime violations end with it.
        for component, violation in list(open_now.items()):
            if violation.started_ms < month_start:
                closed = Violation(**{**_fields(violation), "ended_ms": month_start})
                await self._store.save_transition(Transition("closed", closed))
                del open_now[component]


def _fields(violation: Violation) -> dict[str, Any]:
    return {name: getattr(violation, name) for name in Violation.__slots__}


async def write_due_report(store: SlaStore, settings: Settings, now_ms: int) -> int:
    """Yesterday's reports (per tenant and overall) once due; returns how many were written."""
    day = (datetime.fromtimestamp(now_ms / 1000, tz=UTC) - timedelta(days=1)).date()
    due = report_due(
        day, now_ms, settings.sla_lateness_allowance_s * 1000,
        int(settings.sla_evaluate_interval_s * 1000),
    )  # fmt: skip
    if not due or await store.report_exists(day):
        return 0
    start_ms, end_ms = day_bounds_ms(day)
    # Merged in a thread, as the rows are decoded: a day of every tenant's sketches held the
    # leader's event loop for seconds (about 8 s for 200,000 minutes).
    reports = await asyncio.to_thread(
        daily_reports,
        day,
        await store.minute_rows(start_ms, end_ms),
        await store.violations_between(start_ms, end_ms),
        await store.uptime_between(start_ms, end_ms),
        targets_from(settings),
    )
    written = await store.save_reports(day, reports)
    SLA_REPORTS.inc(written)
    logger.info("SLA daily report of %s: %d tenant keys", day, written)
    return written


class UnsavedWindows:
    """The windows changed since they were last saved to the changelog, per operation, and
    when each key was last saved: a window is saved at most every `every_s` seconds (encoding
    a sketch and producing it on every event made this agent the worker's bottleneck)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._pending: dict[str, dict[str, MinuteWindow]] = {}
        self._saved_at: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, operation: str, window: MinuteWindow) -> None:
        self._pending.setdefault(operation, {})[window.key] = window

    def forget(self, operation: str, key: str) -> None:
        """An expired window: neither saved nor remembered."""
        pending = self._pending.get(operation)
        if pending is not None:
            pending.pop(key, None)
            if not pending:
                del self._pending[operation]
        self._saved_at.pop(key, None)

    def keep(self, wanted: Callable[[MinuteWindow], bool]) -> None:
        """Drops, unsaved, the pending windows that are not `wanted`."""
        self._select(lambda window: not wanted(window))

    def save_due(
        self,
        now_s: float,
        save: Callable[[MinuteWindow], None],
        *,
        operation: str | None = None,
    ) -> int:
        """Saves (and forgets) each pending window (of `operation`) not saved within
        `every_s`; returns how many."""

        def due(window: MinuteWindow) -> bool:
            return now_s - self._saved_at.get(window.key, -math.inf) >= self.every_s

        return self._save(self._select(due, operation), now_s, save)

    def save_all(
        self, now_s: float, save: Callable[[MinuteWindow], None], partitions: set[int] | None
    ) -> int:
        """Saves (and forgets) every pending window of `partitions` (None: all)."""
        chosen = self._select(lambda window: partitions is None or window.partition in partitions)
        return self._save(chosen, now_s, save)

    def _save(
        self, windows: list[MinuteWindow], now_s: float, save: Callable[[MinuteWindow], None]
    ) -> int:
        for window in windows:
            save(window)
            self._saved_at[window.key] = now_s
        return len(windows)

    def _select(
        self, chosen: Callable[[MinuteWindow], bool], operation: str | None = None
    ) -> list[MinuteWindow]:
        """Takes the chosen pending windows (of `operation`) out of the pending set."""
        taken = []
        operations = list(self._pending) if operation is None else [operation]
        for name in operations:
            pending = self._pending.get(name)
            if pending is None:
                continue
            for key, window in list(pending.items()):
                if chosen(window):
                    taken.append(window)
                    del pending[key]
            if not pending:
                del self._pending[name]
        return taken


def register(
    app: AppT,
    lane: BatchLane,
    *,
    settings: Settings,
    latency: TopicT,
    notifications: TopicT,
    dead_letters: TopicT,
    table: TableT[str, Any],
    store: SlaStore,
    prober: Prober,
    max_batch: int,
) -> None:
    lateness_ms = settings.sla_lateness_allowance_s * 1000
    windows = SlaWindows(lateness_ms=lateness_ms, retention_min=max(WINDOWS_MIN.values()) + 1)
    latency_name = latency.get_topic_name()
    partitions = settings.kafka_partitions

    async def notify(notification: Notification) -> None:
        await notifications.send(
            key=notification.tenant_id.encode(), value=notification.model_dump_json().encode()
        )

    evaluator = Evaluator(settings=settings, windows=windows, store=store, notify=notify)
    uptime = UptimeRecorder(settings=settings, prober=prober, store=store)
    targets = targets_from(settings)
    for operation, target_ms in targets.p90_ms.items():
        SLA_TARGET_P90.labels(operation).set(target_ms / 1000)
    SLA_TARGET_ERROR_RATIO.set(targets.error_rate)
    SLA_TARGET_UPTIME.set(targets.uptime)
    SLA_MIN_CALLS.set(targets.min_calls)

    def still_a_member() -> bool:
        consumer = app.consumer
        return not isinstance(consumer, AcknowledgedOnlyConsumer) or consumer.still_a_member()

    def owned() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == latency_name}

    @table.on_recover
    async def restore_windows() -> None:
        windows.restore(state for state in table.values() if state)
        # A window kept from before the rebalance that the restore replaced by a newer saved
        # copy (its partition went to another worker and came back) must not be saved again.
        unsaved.keep(lambda window: windows.windows.get(window.key) is window)
        evaluator.dirty.update(windows.windows)
        evaluator.invalidate()
        logger.info("SLA windows restored: %d minute windows", len(windows.windows))

    unsaved = UnsavedWindows(PERSIST_EVERY_S)

    def save_current(window: MinuteWindow) -> None:
        # As the record's own write, on its partition (the current event's).
        table[window.key] = window.to_state()

    def save_in_partition(window: MinuteWindow) -> None:
        # The partition its events came from, which the current event's write would name.
        put_in_partition(table, window.partition, window.key, window.to_state())

    async def collect_latency(record: SourceRecord) -> None:
        measured = await decode_or_dead_letter(
            LatencyEvent.model_validate_json, record, dead_letters
        )
        if measured is None:
            return
        if record.key != measured.operation.encode():
            # Another key would put this operation's windows on two workers.
            await dead_letter_record(
                dead_letters, record, "record key is not the event's operation", "wrong_key"
            )
            return
        applied = windows.apply(
            Observation(
                operation=measured.operation,
                tenant_id=measured.tenant_id,
                occurred_ms=int(measured.occurred_at.timestamp() * 1000),
                duration_ms=measured.duration_ms,
                error=measured.outcome == "error",
                partition=record.partition,
                offset=record.offset,
            ),
            _now_ms(),
        )
        if applied.dropped is not None:
            SLA_DROPPED_EVENTS.labels(applied.dropped).inc()
            return
        # Encoding a sketch and producing it to the changelog on every event made this agent
        # the worker's bottleneck (measured: 5 ms -> 8 s freshness at 200 messages/s), so a
        # window is persisted at most every PERSIST_EVERY_S; a crash loses at most that
        # much of the sketches, the in-memory windows serve every read.
        for window in applied.changed:
            unsaved.add(measured.operation, window)
            evaluator.dirty.add(window.key)
        unsaved.save_due(time.monotonic(), save_current, operation=measured.operation)
        for key in applied.expired:
            unsaved.forget(measured.operation, key)
            if key in table:
                del table[key]
            evaluator.dirty.discard(key)
        LATENCY_EVENTS.labels(measured.operation, measured.outcome).inc()
        OPERATION_DURATION.labels(measured.operation).observe(measured.duration_ms / 1000)

    lane.add_record_handler("sla", [latency], collect_latency, max_batch=max_batch)

    @app.timer(interval=PERSIST_EVERY_S)
    async def persist_quiet_windows() -> None:
        """Saves the windows an operation's last event changed within PERSIST_EVERY_S of the
        save before: they waited for the operation's next event, which for a quiet operation
        could be an hour away, and a crash lost that much of its sketches."""
        if app.rebalancing or not unsaved:
            return
        mine = owned()
        # Moved (and saved as it left): its new owner restored the windows from the changelog.
        unsaved.keep(lambda window: window.partition in mine)
        unsaved.save_due(time.monotonic(), save_in_partition)

    def save_leaving(partitions: set[int] | None) -> None:
        """Saves now every unsaved window of `partitions` (None: all): the worker that reads
        them next restores them from the changelog, and lost up to PERSIST_EVERY_S of each
        operation's events (a rolling deploy lost a second of every operation's latencies)."""
        saved = unsaved.save_all(time.monotonic(), save_in_partition, partitions)
        if saved:
            logger.info("SLA windows saved before leaving their partitions: %d", saved)

    # mode's handler type spells the `signal` argument's type as a string no signature matches.
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def save_before_revocation(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        leaving = {tp.partition for tp in revoked if tp.topic == latency_name}
        if not still_a_member():
            # Dropped by the coordinator: the partitions are another worker's already, and
            # this worker's copies would overwrite the newer windows it saved.
            unsaved.keep(lambda window: window.partition not in leaving)
            return
        save_leaving(leaving)
        # The app's own flush may have run before this receiver.
        await app.producer.flush()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def save_before_shutdown(sender: Any, **kwargs: Any) -> None:
        # Faust stops the consumer (every agent done) before this signal and flushes the
        # producer after it. A worker that left its group while stopping saved its windows
        # then (WorkerApp._on_partitions_revoked), while they were still its own.
        if not getattr(app, "left_group_stopping", False):
            save_leaving(None)

    @app.timer(interval=settings.sla_evaluate_interval_s)
    async def evaluate_sla() -> None:
        if app.rebalancing:
            return
        mine = owned()
        try:
            await evaluator.run(
                mine, lambda op: partition_of(op.encode(), partitions) in mine, _now_ms()
            )
        except _UNAVAILABLE as exc:
            logger.warning("SLA evaluation postponed: %r", exc)

    @app.timer(interval=settings.sla_probe_interval_s, on_leader=True)
    async def probe_uptime() -> None:
        now_ms = _now_ms()
        try:
            # Storing and judging get one probe interval: a PostgreSQL that hangs (rather than
            # refuses) held each round for up to a minute, and as each failed round counts one
            # interval of downtime, a 30-minute outage was stored as a few minutes.
            await uptime.probe(now_ms)  # each probe has its own timeout
            async with asyncio.timeout(settings.sla_probe_interval_s):
                await uptime.store(now_ms)
            # Not under the timeout: cancelled between a violation's save and its record in
            # `open`, the next round opened it (and alerted) again.
            await uptime.judge(now_ms, notify)
        except _UNAVAILABLE_OR_HUNG as exc:
            # PostgreSQL down: the round was probed (and is on the gauges) but not stored.
            logger.warning("uptime round not stored: %r", exc)

    @app.timer(interval=settings.sla_probe_interval_s)
    async def forget_uptime_unless_leader() -> None:
        # Set by the leader alone: an ex-leader kept exporting its last "postgres up" beside
        # the new leader's "down", and the alert's max() saw the component up.
        if not app.is_leader():
            for gauge in (SLA_COMPONENT_UP, SLA_UPTIME_RATIO, SLA_DOWNTIME):
                gauge.clear()
            uptime.step_down()

    @app.timer(interval=_REPORT_CHECK_S, on_leader=True)
    async def daily_report() -> None:
        try:
            await write_due_report(store, settings, _now_ms())
        except _UNAVAILABLE as exc:
            logger.warning("SLA daily report postponed: %r", exc)


def worker_urls(app: AppT, table: TableT[str, Any]) -> set[str]:
    """Every worker URL the group's routing metadata knows, this one included."""
    urls = set(app.router.table_metadata(table.name))
    urls.add(str(app.conf.canonical_url))
    return urls


def install(
    app: AppT,
    lane: BatchLane,
    settings: Settings,
    *,
    pool: PoolFactory,
    dead_letters: TopicT,
    latency: TopicT,
    notifications: TopicT,
    max_batch: int,
) -> None:
    """Builds what SLA monitoring needs and registers it (called by the composition root)."""

    # Keys are window keys ("operation|tenant|minute"); each is written while processing an
    # event of its operation, so it lands on that operation's partition of the changelog.
    table = app.Table("sla_windows", key_type=str, partitions=settings.kafka_partitions)
    publisher = EventPublisher(settings)
    prober = Prober(
        http=lambda: app.http_client,
        api_url=settings.sla_probe_api_url,
        worker_urls=lambda: worker_urls(app, table),
        publisher=publisher,
        pool=pool,
        timeout_s=min(3.0, settings.sla_probe_interval_s),
    )
    register(
        app,
        lane,
        settings=settings,
        latency=latency,
        notifications=notifications,
        dead_letters=dead_letters,
        table=table,
        store=SlaStore(pool),
        prober=prober,
        max_batch=max_batch,
    )
