"""WORKER_STANDBY_REPLICAS reaches Faust: each copy of another worker's tables costs its
changelog traffic, and none makes a moved partition replay its whole changelog."""

from __future__ import annotations

import faust

from tests.unit.conftest import WORKER_STANDBY_REPLICAS


def test_the_worker_keeps_the_configured_standby_copies(worker_app: faust.App) -> None:
    assert worker_app.conf.table_standby_replicas == WORKER_STANDBY_REPLICAS
