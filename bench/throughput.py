"""Benchmark (a) and (b): the ceiling of a plain aiokafka consumer, and the whole pipeline.

N inbound events (one lead each, so each is a first interview step) are produced before
anything reads them. (a) a plain aiokafka consumer reads and decodes all of them; (b) one
worker with every agent on (sessions, qualification with the built-in extractor, leakage,
tokens, SLA, sinks) processes the same backlog, and the rate is taken from its counters: the
time until every event was applied to the sessions table, interviewed and charged.

What (b) can reach is bounded by the records each event costs: the worker's writes (effects
and changelogs) and the records it reads back, counted from the topics' end offsets once it
is done. A plain producer sending pre-encoded records (a') and a plain consumer reading without
decoding give the Kafka client's own CPU per record; per event, that much CPU is spent before
any agent does anything, so a worker cannot pass one core divided by it.

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
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

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


@dataclass(frozen=True)
class ClientCost:
    """A plain client's records per second, and its process's CPU seconds per record."""

    per_s: float
    cpu_s_per_record: float


async def produce(bootstrap: str, topic: str, tenant_id: str, count: int) -> ClientCost:
    """Produces the backlog: (a'), a plain producer sending records already encoded (acks=all,
    in large batches: the least CPU per record aiokafka needs to send one)."""
    now = datetime.now(UTC)
    records = []
    for i in range(count):
        contact = f"+91980{i:07d}"
        lead_id = lead_id_for(tenant_id, "whatsapp", contact)
        event = InboundMessage(
            event_id=str(uuid.uuid4()), tenant_id=tenant_id, occurred_at=now,
            lead_id=lead_id, channel="whatsapp", contact=contact,
            text="Hi, we need a CRM for our sales team", received_at=now,
        )  # fmt: skip
        records.append((lead_id.encode(), event.model_dump_json().encode()))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024)  # fmt: skip
    await producer.start()
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        for key, value in records:
            await producer.send(topic, key=key, value=value)
        await producer.flush()
        return ClientCost(
            count / (time.perf_counter() - started), (time.process_time() - cpu_started) / count
        )
    finally:
        await producer.stop()


async def ceiling(bootstrap: str, topic: str, count: int, *, decode: bool = True) -> ClientCost:
    """(a): a plain consumer reading and validating the events (without `decode`, only reading:
    the least CPU per record aiokafka needs to read one, in fetches of up to 4 MiB)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024)  # fmt: skip
    await consumer.start()
    seen = 0
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                for record in records:
                    if decode:
                        InboundMessage.model_validate_json(record.value)
                    seen += 1
        return ClientCost(
            count / (time.perf_counter() - started), (time.process_time() - cpu_started) / count
        )
    finally:
        await consumer.stop()


async def records_written(bootstrap: str, prefix: str) -> Counter[str]:
    """Records in each topic of the run (the pipeline's and the table changelogs): the sum of
    its partitions' end offsets."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        prefixes = (f"{prefix}.", f"{prefix}-")
        topics = [t for t in await admin.list_topics() if t.startswith(prefixes)]
        partitions = [TopicPartition(description["topic"], partition["partition"])
                      for description in await admin.describe_topics(topics)
                      for partition in description["partitions"]]  # fmt: skip
        written: Counter[str] = Counter()
        for tp, end in (await consumer.end_offsets(partitions)).items():
            written[tp.topic] += end
        return written
    finally:
        await consumer.stop()
        await admin.close()


def settled_records(bootstrap: str, prefix: str, timeout_s: float = 60) -> Counter[str]:
    """The run's records once the worker stopped writing (sends and sinks finish after the
    counters the rate is taken from): two counts 2 s apart that agree."""
    last = asyncio.run(records_written(bootstrap, prefix))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(2)
        now = asyncio.run(records_written(bootstrap, prefix))
        if now == last:
            break
        last = now
    return last


def fan_out(
    written: Counter[str], names: TopicNames, events: int, *, read: ClientCost,
    write: ClientCost,
) -> dict[str, Any]:  # fmt: skip
    """What one inbound event costs in records, and the CPU the Kafka client alone spends on
    them.

    The worker writes effects and changelog records, and reads back every pipeline topic (the
    inbound record included; the dead letters and their marks too, none here). At the plain
    clients' CPU per record read (`read`) and sent (`write`), those records take
    `client_cpu_ms_per_event` of CPU before any agent does anything: one core passes at most
    `events_per_core_s` such events."""
    changelogs = set(names.changelogs())
    read_topics = set(names.all()) - changelogs - {names.dead_letters, names.dead_letters_replayed}
    written_by_worker = sum(n for t, n in written.items() if t != names.inbound_messages)
    read_by_worker = sum(n for t, n in written.items() if t in read_topics)
    client_cpu_s = (
        read_by_worker * read.cpu_s_per_record + written_by_worker * write.cpu_s_per_record
    ) / events
    prefix = len(names.prefix) + 1
    return {
        "per_topic": {t[prefix:]: round(n / events, 2) for t, n in sorted(written.items()) if n},
        "written_per_event": round(written_by_worker / events, 2),
        "read_per_event": round(read_by_worker / events, 2),
        "client_cpu_ms_per_event": round(client_cpu_s * 1000, 4),
        "events_per_core_s": round(1 / max(client_cpu_s, 1e-12)),
    }


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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=positive_int, default=20_000)
    parser.add_argument("--credited", action="store_true",
                        help="credit the tenant before the backlog is read")  # fmt: skip
    args = parser.parse_args()
    with bench_environment(worker_port=WORKER_PORT) as environment:
        if args.credited:
            credit_tenant(environment)
        settings = environment.settings
        topic = TopicNames(settings.topic_prefix).inbound_messages
        bootstrap = settings.kafka_bootstrap_servers
        sent = asyncio.run(produce(bootstrap, topic, environment.tenant_id, args.events))
        print(f"(a') plain aiokafka producer, records already encoded: {sent.per_s:,.0f}/s, "
              f"{sent.cpu_s_per_record * 1e6:.1f} us CPU each")  # fmt: skip
        read = asyncio.run(ceiling(bootstrap, topic, args.events, decode=False))
        decoded = asyncio.run(ceiling(bootstrap, topic, args.events))
        plain = decoded.per_s
        print(f"(a) plain aiokafka consumer + decode: {plain:,.0f} events/s "
              f"(without decoding: {read.cpu_s_per_record * 1e6:.1f} us CPU each)")  # fmt: skip
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
            records = fan_out(
                settled_records(bootstrap, settings.topic_prefix),
                TopicNames(settings.topic_prefix),
                args.events,
                read=read,
                write=sent,
            )
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
        "plain_producer": {
            "records_per_s": round(sent.per_s),
            "cpu_us_per_record": round(sent.cpu_s_per_record * 1e6, 2),
        },
        "plain_reader_cpu_us_per_record": round(read.cpu_s_per_record * 1e6, 2),
        "pipeline_events_per_s": round(pipeline),
        "ratio": round(pipeline / plain, 3),
        "worker_cpu_ms_per_event": round(cpu_ms_per_event, 3),
        "complete": complete,
        "gc_ms": paused["gc_ms"],
        "gc_mean_ms": paused["gc_mean_ms"],
        "gc_share_of_worker_cpu": round(gc_share, 3),
        "gc_gen2_collections": paused["gc_gen2"],
        "credited_before": args.credited,
        "records": records,
        "final_counters": last,
        "machine": machine_facts(),
    }
    path = write_result("throughput", result)
    print(f"(b) one worker, every agent on: {pipeline:,.0f} events/s  "
          f"(b)/(a) = {pipeline / plain:.3f}  worker CPU {cpu_ms_per_event:.2f} ms/event  "
          f"GC {gc_share:.0%} of it ({paused['gc_mean_ms']} ms a collection)  "
          f"complete={complete}  ({path})")  # fmt: skip
    print(f"    per inbound event the worker wrote {records['written_per_event']} records and "
          f"read back {records['read_per_event']}: {records['client_cpu_ms_per_event']} ms of "
          f"the Kafka client's CPU at the plain clients' cost per record, so at most "
          f"{records['events_per_core_s']:,} events/s on a core, "
          f"{records['events_per_core_s'] / plain:.3f} of (a)")  # fmt: skip
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
