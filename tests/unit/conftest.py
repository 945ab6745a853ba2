"""Fixtures of the unit tests."""

from __future__ import annotations

import faust
import pytest

from flexoraa.settings import Settings
from streams.app import create_worker_app

# Settings the worker app's tests check are wired through (their defaults are 25, 0 and
# 524,288).
WORKER_FETCH_MAX_WAIT_MS = 40
WORKER_STANDBY_REPLICAS = 1
WORKER_PRODUCER_BATCH_BYTES = 300_000


@pytest.fixture(scope="session")
def worker_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        topic_prefix="unit-worker",
        stack_dir=tmp_path_factory.mktemp("stack"),
        worker_fetch_max_wait_ms=WORKER_FETCH_MAX_WAIT_MS,
        worker_standby_replicas=WORKER_STANDBY_REPLICAS,
        worker_producer_batch_bytes=WORKER_PRODUCER_BATCH_BYTES,
    )


@pytest.fixture(scope="session")
def worker_app(worker_settings: Settings) -> faust.App:
    """The worker's composition root, built once: it registers the process's Prometheus
    metrics, which a second app in the same process would register again."""
    return create_worker_app(worker_settings)
