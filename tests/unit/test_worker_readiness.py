"""When a worker answers /ready: tables recovered and routable, and tenant statuses read."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from streams.web import unready_reason

PARTITIONS = 4
SESSIONS = cast(Any, SimpleNamespace(name="sessions"))


def worker(*, rebalancing: bool = False, owned: int = PARTITIONS) -> Any:
    """A stand-in for the Faust app with what readiness looks at."""
    metadata = {"http://127.0.0.1:6066": {"sessions-changelog": set(range(owned))}}
    return SimpleNamespace(
        consumer=SimpleNamespace(assignment=lambda: {("inbound", p) for p in range(owned)}),
        rebalancing=rebalancing,
        in_recovery=False,
        router=SimpleNamespace(table_metadata=lambda name: metadata),
    )


def test_ready_once_tables_are_routable_and_statuses_read() -> None:
    assert unready_reason(worker(), SESSIONS, PARTITIONS, lambda: True) is None


def test_not_ready_while_tenant_statuses_are_being_read() -> None:
    # Every AI action waits for the statuses; a load sent meanwhile queued behind them.
    assert unready_reason(worker(), SESSIONS, PARTITIONS, lambda: False) == (
        "reading tenant statuses"
    )


def test_not_ready_while_rebalancing_or_before_every_partition_has_an_owner() -> None:
    assert unready_reason(worker(rebalancing=True), SESSIONS, PARTITIONS, lambda: True) == (
        "rebalancing or recovering tables"
    )
    assert unready_reason(worker(owned=3), SESSIONS, PARTITIONS, lambda: True) == (
        "rebalancing or recovering tables"
    )
