"""WORKER_STANDBY_REPLICAS reaches Faust: each copy of another worker's tables costs its
changelog traffic, and saves a moved partition its replay only with a store that keeps
changelog offsets."""

from __future__ import annotations

import faust

from flexoraa.settings import Settings, unused_standby_copies
from tests.unit.conftest import WORKER_STANDBY_REPLICAS


def test_the_worker_keeps_the_configured_standby_copies(worker_app: faust.App) -> None:
    assert worker_app.conf.table_standby_replicas == WORKER_STANDBY_REPLICAS


def test_copies_a_memory_store_cannot_use_are_reported() -> None:
    assert unused_standby_copies(Settings(worker_standby_replicas=0)) is None
    reason = unused_standby_copies(Settings(worker_standby_replicas=1))
    assert reason is not None
    assert "WORKER_STANDBY_REPLICAS=1" in reason
    assert "memory://" in reason
    kept_offsets = Settings(worker_standby_replicas=1, table_store="rocksdb://")
    assert unused_standby_copies(kept_offsets) is None
