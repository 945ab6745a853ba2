"""Benchmark (a) and (b): the ceiling of a plain aiokafka consumer, and the whole pipeline.

N inbound events (one lead each, so each is a first interview step) are produced before
anything reads them. (a) a plain aiokafka consumer reads and decodes all of them; (b) one
worker with every agent on (sessions, qualification with the built-in extractor, leakage,
tokens, SLA, sinks) processes the same backlog, and the rate is taken from its counters: the
time until every event was applied to the sessions table, interviewed and charged.

The tenant's credit goes out through the worker's outbox relay, so a worker started on the
backlog finds the tenant without tokens and defers every step until the credit arrives.
`--credited` first runs a worker until the credit is applied (as in production, where a
tenant has tokens before its leads write), then stops it and starts a new one on the backlog.

    .venv/bin/python -m bench.throughput --events 20000
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import uuid
from datetime import UTC, datetime

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import (
    BenchEnvironment,
    bench_environment,
    cpu_seconds,
    machine_facts,
    pauses_between,
    pauses_in,
    wait_ready,
    write_result,
)
from schemas.events import InboundMessage
from schemas.topics import TopicNames
from streams.rules.identity import lead_id_for

WORKER_PORT = 16066
_SERIES = {
    "sessions": re.compile(r"^flexoraa_inbound_events_total\{[^}]*\} ([0-9.e+]+)$", re.M),
    "interviewed": re.compile(r"^flexoraa_qualification_steps_total\{[^}]*\} ([0-9.e+]+)$", re.M),
    "charged": re.compile(r'^flexoraa_token_events_total\{kind="usage"\} ([0-9.e+]+)$', re.M),
}
_CREDITS = re.compile(r'^flexoraa_token_events_total\{kind="credit"\} ([0-9.e+]+)$', re.M)


async def produce(bootstrap: str, topic: str, tenant_id: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024)  # fmt: skip
    await producer.start()
    try:
        now = datetime.now(UTC)
        for i in range(count):
            contact = f"+91980{i:07d}"
            lead_id = lead_id_for(tenant_id, "whatsapp", contact)
            event = InboundMessage(
                event_id=str(uuid.uuid4()), tenant_id=tenant_id, occurred_at=now,
                lead_id=lead_id, channel="whatsapp", contact=contact,
                text="Hi, we need a CRM for our sales team", received_at=now,
            )  # fmt: skip
            await producer.send(topic, key=lead_id.encode(), value=event.model_dump_json().encode())
        await producer.flush()
    finally:
        await producer.stop()


async def ceiling(bootstrap: str, topic: str, count: int) -> float:
    """(a): events per second a plain consumer reads and validates."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024)  # fmt: skip
    await consumer.start()
    seen = 0
    try:
        started = time.perf_counter()
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                for record in records:
                    InboundMessage.model_validate_json(record.value)
                    seen += 1
        return count / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def counters(text: str) -> dict[str, float]:
    return {name: sum(float(v) for v in pattern.findall(text)) for name, pattern in _SERIES.items()}


def credit_tenant(environment: BenchEnvironment) -> None:
    """Runs a worker until the tenant's credit is in its account, then stops it cleanly."""
    worker = environment.start("worker", WORKER_PORT=str(WORKER_PORT),
                               WORKER_WEB_PORT=str(WORKER_PORT))  # fmt: skip
    try:
        url = f"http://127.0.0.1:{WORKER_PORT}"
        wait_ready(f"{url}/health")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            credits = _CREDITS.findall(httpx.get(f"{url}/metrics", timeout=30).text)
            if credits and float(credits[0]) >= 1:
                return
            time.sleep(0.25)
        raise RuntimeError("the tenant's credit was not applied within 120 s")
    finally:
        environment.stop(worker, timeout_s=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--credited", action="store_true",
                        help="credit the tenant before the backlog is read")  # fmt: skip
    args = parser.parse_args()
    with bench_environment(worker_port=WORKER_PORT) as environment:
        if args.credited:
            credit_tenant(environment)
        settings = environment.settings
        topic = TopicNames(settings.topic_prefix).inbound_messages
        bootstrap = settings.kafka_bootstrap_servers
        asyncio.run(produce(bootstrap, topic, environment.tenant_id, args.events))
        plain = asyncio.run(ceiling(bootstrap, topic, args.events))
        print(f"(a) plain aiokafka consumer + decode: {plain:,.0f} events/s")
        worker = environment.start("worker", WORKER_PORT=str(WORKER_PORT),
                                   WORKER_WEB_PORT=str(WORKER_PORT))  # fmt: skip
        try:
            url = f"http://127.0.0.1:{WORKER_PORT}"
            # Not /ready: a worker busy with the backlog answers its web pages late.
            wait_ready(f"{url}/health")
            samples: list[tuple[float, float, dict[str, float], dict[str, float]]] = []
            deadline = time.monotonic() + 1200
            while time.monotonic() < deadline:
                try:
                    page = httpx.get(f"{url}/metrics", timeout=30).text
                except httpx.HTTPError:
                    time.sleep(0.25)
                    continue
                now = counters(page)
                samples.append((time.monotonic(), cpu_seconds(worker.pid), now, pauses_in(page)))
                if min(now.values()) >= args.events:
                    break
                # Each scrape costs the worker (about 2 % of it at four a second).
                time.sleep(1)
        finally:
            worker.kill()
            worker.wait(30)
    # The slope between the first sample and completion (the worker may have applied some
    # events before its web server answered): events fully processed per second.
    first_t, first_cpu, first, first_pauses = samples[0]
    finished, last_cpu, last, last_pauses = samples[-1]
    complete = min(last.values()) >= args.events
    done = min(last.values()) - min(first.values())
    pipeline = done / max(finished - first_t, 1e-9)
    # The worker's own CPU per event: what a change saves, less the noise of the machine.
    cpu_ms_per_event = 1000 * (last_cpu - first_cpu) / max(done, 1)
    # Garbage collection is CPU time too, charged to whichever line allocated when it started:
    # a profile spreads it thin, this puts a number on it.
    paused = pauses_between(first_pauses, last_pauses)
    gc_share = paused["gc_ms"] / max(1000 * (last_cpu - first_cpu), 1e-9)
    result = {
        "events": args.events,
        "ceiling_events_per_s": round(plain),
        "pipeline_events_per_s": round(pipeline),
        "ratio": round(pipeline / plain, 3),
        "worker_cpu_ms_per_event": round(cpu_ms_per_event, 3),
        "complete": complete,
        "gc_ms": paused["gc_ms"],
        "gc_share_of_worker_cpu": round(gc_share, 3),
        "gc_gen2_collections": paused["gc_gen2"],
        "credited_before": args.credited,
        "final_counters": last,
        "machine": machine_facts(),
    }
    path = write_result("throughput", result)
    print(f"(b) one worker, every agent on: {pipeline:,.0f} events/s  "
          f"(b)/(a) = {pipeline / plain:.3f}  worker CPU {cpu_ms_per_event:.2f} ms/event  "
          f"GC {gc_share:.0%} of it  complete={complete}  ({path})")  # fmt: skip
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
