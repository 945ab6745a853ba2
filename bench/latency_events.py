"""Benchmark: the CPU a process spends producing its latency events (flexoraa.latency).

The API records one latency event per request and the recorder produces them every
`LATENCY_FLUSH_INTERVAL_MS`. This records `--events` events in flushes of `--per-flush` (about
what 1,000 requests a second leave in 200 ms), produces them through the recorder to the local
broker, and prints the process's CPU per event, building and encoding included: 21.7-26.2 us
(3 runs) since the recorder appends its events to aiokafka's record batches, one or more per
partition, against 32.3-35.0 us (2 runs) with a `send` per event before.

    .venv/bin/python -m bench.latency_events --events 50000
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from bench.common import write_result
from bench.throughput import positive_int
from flexoraa import stack
from flexoraa.kafka import ensure_topics
from flexoraa.latency import LATENCY_EVENTS_SENT, LatencyRecorder
from flexoraa.settings import Settings
from schemas.topics import TopicNames

# A tenant's UUID: any other id is recorded platform-wide (`latency_tenant`), another path.
BENCH_TENANT = str(uuid.UUID("6a3c1f2e-8b4d-4e7a-9c5f-1d2e3f4a5b6c"))


async def measure(settings: Settings, events: int, per_flush: int) -> float:
    """Seconds of this process's CPU per event recorded and produced."""
    recorder = LatencyRecorder(settings, TopicNames(settings.topic_prefix).latency)
    sent_before = LATENCY_EVENTS_SENT.labels("api_request")._value.get()
    # One event first: the producer starts with the first flush that has something to send.
    recorder.record("api_request", 1.0)
    await recorder.flush()
    started = time.process_time()
    for done in range(0, events, per_flush):
        for i in range(min(per_flush, events - done)):
            recorder.record("api_request", float(i % 50), tenant_id=BENCH_TENANT, ok=i % 100 != 0)
        await recorder.flush()
    spent = time.process_time() - started
    await recorder.close()
    sent = LATENCY_EVENTS_SENT.labels("api_request")._value.get() - sent_before
    if sent != events + 1:
        raise RuntimeError(f"{sent:.0f} of {events + 1} latency events were acknowledged")
    return spent / events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=positive_int, default=50_000)
    parser.add_argument("--per-flush", type=positive_int, default=200)
    args = parser.parse_args()
    base = Settings()
    stack.stack_up(base)
    settings = base.model_copy(update={"topic_prefix": f"bench-{uuid.uuid4().hex[:8]}"})
    asyncio.run(ensure_topics(settings))
    cpu_s = asyncio.run(measure(settings, args.events, args.per_flush))
    path = write_result(
        "latency_events",
        {"events": args.events, "per_flush": args.per_flush, "cpu_us_per_event": cpu_s * 1e6},
    )
    print(
        f"latency events: {cpu_s * 1e6:.1f} us of CPU each, recorded and produced in flushes "
        f"of {args.per_flush} ({path})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
