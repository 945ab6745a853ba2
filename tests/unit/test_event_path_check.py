"""Faust's check that every assigned partition is fetched leaves paused changelogs alone."""

from __future__ import annotations

from typing import Any

import faust
import pytest
from aiokafka import TopicPartition
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP

PAUSED = TP("worker-sessions-changelog", 3)
FETCHED = TP("worker-inbound-messages", 3)


class _Consumer:
    def paused(self) -> set[Any]:
        # aiokafka's own answer holds its TopicPartition, a tuple equal to Faust's TP.
        return {TopicPartition(PAUSED.topic, PAUSED.partition)}


def test_a_paused_partition_is_not_reported_as_stuck(
    worker_app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[TP] = []
    monkeypatch.setattr(
        AIOKafkaConsumerThread, "verify_event_path", lambda self, now, tp: checked.append(tp)
    )
    thread = worker_app.consumer._thread  # type: ignore[attr-defined]
    monkeypatch.setattr(thread, "_consumer", _Consumer())
    thread.verify_event_path(1_000.0, PAUSED)
    thread.verify_event_path(1_000.0, FETCHED)
    # Only the partition aiokafka fetches goes through Faust's check.
    assert checked == [FETCHED]
