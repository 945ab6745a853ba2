"""The latency recorder's hot path: O(1) appends, bounded buffer, outcomes of measured blocks."""

from __future__ import annotations

import pytest

from flexoraa.latency import LATENCY_EVENTS_DROPPED, LatencyRecorder
from flexoraa.settings import Settings
from streams.rules.sla import NO_TENANT


def _recorder(**overrides: object) -> LatencyRecorder:
    settings = Settings(environment="test", **overrides)  # type: ignore[arg-type]
    return LatencyRecorder(settings, "test.latency")


def test_the_buffer_is_bounded_and_drops_the_oldest_counting_them() -> None:
    recorder = _recorder(latency_buffer_max=3)
    before = LATENCY_EVENTS_DROPPED.labels("buffer_full")._value.get()
    for i in range(5):
        recorder.record("api_request", float(i))
    assert len(recorder) == 3
    assert [item.duration_ms for item in recorder._buffer] == [2.0, 3.0, 4.0]
    assert LATENCY_EVENTS_DROPPED.labels("buffer_full")._value.get() - before == 2


def test_measure_records_ok_failed_and_raised_blocks() -> None:
    recorder = _recorder()
    with recorder.measure("verification", tenant_id="t1"):
        pass
    with recorder.measure("verification") as measured:
        measured.fail("signature check unavailable")
    with pytest.raises(ValueError, match="boom"), recorder.measure("verification"):
        raise ValueError("boom")
    items = list(recorder._buffer)
    assert [item.ok for item in items] == [True, False, False]
    assert [item.tenant_id for item in items] == ["t1", NO_TENANT, NO_TENANT]
    assert items[1].detail == "signature check unavailable"
    assert items[2].detail == "ValueError"
    assert all(item.duration_ms >= 0 for item in items)


async def test_measure_works_as_an_async_context_manager() -> None:
    recorder = _recorder()
    async with recorder.measure("ai_message", tenant_id="t2"):
        pass
    assert recorder._buffer[0].operation == "ai_message"


def test_nothing_is_buffered_when_sla_monitoring_is_off() -> None:
    recorder = _recorder(enable_sla_monitoring=False)
    recorder.record("api_request", 1.0)
    assert len(recorder) == 0
