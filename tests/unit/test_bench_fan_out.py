"""The throughput benchmark's bound: the records one inbound event costs, and the rate they cap."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.throughput import fan_out
from schemas.topics import TopicNames

NAMES = TopicNames("run")


def test_counts_reads_and_writes_per_inbound_event() -> None:
    written = Counter(
        {
            NAMES.inbound_messages: 100,  # read, not written by the worker
            NAMES.lead_events: 100,  # written and read back
            NAMES.token_usage: 100,
            NAMES.dead_letters: 5,  # written, never read
            NAMES.changelog("sessions"): 100,  # written, read only by recovery
            NAMES.changelog("deadlines"): 200,
        }
    )
    records = fan_out(written, NAMES, 100, read_ceiling=1_000.0, write_ceiling=500.0)
    assert records["written_per_event"] == 5.05
    assert records["read_per_event"] == 3.0
    # 100 events cost at least 300/1000 s of reading and 505/500 s of writing.
    assert records["events_per_s_bound"] == round(100 / (0.3 + 1.01))
    assert records["ratio_bound"] == pytest.approx(100 / 1.31 / 1_000, abs=1e-3)
    assert records["per_topic"] == {
        "dead-letters": 0.05,
        "deadlines-changelog": 2.0,
        "inbound-messages": 1.0,
        "lead-events": 1.0,
        "sessions-changelog": 1.0,
        "token-usage": 1.0,
    }


def test_topics_without_records_are_left_out() -> None:
    written = Counter({NAMES.inbound_messages: 10, NAMES.latency: 0})
    records = fan_out(written, NAMES, 10, read_ceiling=100.0, write_ceiling=100.0)
    assert records["per_topic"] == {"inbound-messages": 1.0}
    assert records["written_per_event"] == 0.0
    assert records["events_per_s_bound"] == 100
