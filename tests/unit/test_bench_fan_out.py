"""The throughput benchmark's bound: the records one inbound event costs, and the CPU the Kafka
client alone spends on them."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.throughput import ClientCost, fan_out
from schemas.topics import TopicNames

NAMES = TopicNames("run")
# 1 ms of CPU per record read, 2 ms per record sent.
READ = ClientCost(per_s=1_000.0, cpu_s_per_record=0.001)
WRITE = ClientCost(per_s=500.0, cpu_s_per_record=0.002)


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
    records = fan_out(written, NAMES, 100, read=READ, write=WRITE)
    assert records["written_per_event"] == 5.05
    assert records["read_per_event"] == 3.0
    # Per event: 3 records read at 1 ms and 5.05 written at 2 ms.
    assert records["client_cpu_ms_per_event"] == pytest.approx(3 + 10.1)
    assert records["events_per_core_s"] == round(1 / 0.0131)
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
    records = fan_out(written, NAMES, 10, read=READ, write=WRITE)
    assert records["per_topic"] == {"inbound-messages": 1.0}
    assert records["written_per_event"] == 0.0
    assert records["events_per_core_s"] == 1_000
