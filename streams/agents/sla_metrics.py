"""Prometheus metrics of SLA monitoring (exported on the worker's `/metrics` page).

Gauges carry the all-tenants view only: a tenant label would multiply every series by the
number of tenants. Per-tenant figures are in PostgreSQL and the monitoring API.
"""

import math

from prometheus_client import Counter, Gauge, Histogram

from streams.rules.sla import OPERATIONS, Rolling

OPERATION_DURATION = Histogram(
    "flexoraa_operation_duration_seconds",
    "Duration of measured operations, from the latency events",
    ["operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LATENCY_EVENTS = Counter(
    "flexoraa_latency_events", "Latency events counted into SLA windows", ["operation", "outcome"]
)
SLA_DROPPED_EVENTS = Counter(
    "flexoraa_sla_dropped_events",
    "Latency events not counted: later than the allowance, or already counted",
    ["reason"],
)
SLA_P90 = Gauge(
    "flexoraa_sla_latency_p90_seconds",
    "Rolling P90 latency of all tenants (merged minute sketches)",
    ["operation", "window"],
)
SLA_P99 = Gauge(
    "flexoraa_sla_latency_p99_seconds",
    "Rolling P99 latency of all tenants (merged minute sketches)",
    ["operation", "window"],
)
SLA_ERROR_RATIO = Gauge(
    "flexoraa_sla_error_ratio", "Rolling error ratio of all tenants", ["operation", "window"]
)
SLA_CALLS = Gauge("flexoraa_sla_calls", "Calls in the rolling window", ["operation", "window"])
SLA_TARGET_P90 = Gauge(
    "flexoraa_sla_target_p90_seconds", "SLA target of the P90 latency", ["operation"]
)
SLA_TARGET_ERROR_RATIO = Gauge("flexoraa_sla_target_error_ratio", "SLA target of the error ratio")
SLA_TARGET_UPTIME = Gauge("flexoraa_sla_target_uptime_ratio", "SLA target of the uptime")
SLA_OPEN_VIOLATIONS = Gauge(
    "flexoraa_sla_open_violations",
    "Open SLA violations (all tenant keys) on this worker's operations",
    ["operation", "metric"],
)
SLA_COMPONENT_UP = Gauge(
    "flexoraa_sla_component_up", "Last probe of a component: 1 up, 0 down", ["component"]
)
SLA_PROBES = Counter(
    "flexoraa_sla_probes", "Uptime probes by component and outcome", ["component", "outcome"]
)
SLA_UPTIME_RATIO = Gauge(
    "flexoraa_sla_uptime_ratio",
    "Probe-measured uptime so far in the period (day or month, UTC)",
    ["component", "period"],
)
SLA_DOWNTIME = Gauge(
    "flexoraa_sla_downtime_seconds",
    "Probe-measured downtime so far in the period (day or month, UTC)",
    ["component", "period"],
)
SLA_MIN_CALLS = Gauge(
    "flexoraa_sla_min_calls", "Calls a window needs before its P90 or error rate is judged"
)
SLA_REPORTS = Counter("flexoraa_sla_daily_reports", "Daily SLA reports written (tenant keys)")


def publish_rolling(operation: str, window: str, summary: Rolling) -> None:
    """Set the rolling gauges of one operation and window (NaN where there is no figure)."""
    SLA_CALLS.labels(operation, window).set(summary.calls)
    SLA_P90.labels(operation, window).set(_seconds(summary.p90_ms))
    SLA_P99.labels(operation, window).set(_seconds(summary.p99_ms))
    rate = summary.error_rate
    SLA_ERROR_RATIO.labels(operation, window).set(math.nan if rate is None else rate)


def _seconds(ms: float | None) -> float:
    return math.nan if ms is None else ms / 1000


# Every known label set starts at zero, so a rate() over a counter that has not moved yet is 0
# rather than no data, and the series exist before the first event.
for _operation in OPERATIONS:
    OPERATION_DURATION.labels(_operation)
    for _outcome in ("ok", "error"):
        LATENCY_EVENTS.labels(_operation, _outcome)
for _reason in ("late", "duplicate"):
    SLA_DROPPED_EVENTS.labels(_reason)
for _component in ("api", "workers", "kafka", "postgres", "platform"):
    for _outcome in ("up", "down"):
        SLA_PROBES.labels(_component, _outcome)
