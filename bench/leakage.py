"""Benchmark: leakage timer lateness for many leads, beside the old 5-minute SQL scan.

Produces N inbound messages straight to Kafka (one per lead) whose leak deadlines are spread
over a few minutes, runs one worker with the leak threshold as a setting, and reads every
fired leak from PostgreSQL: lateness p50/p99/max (the action's time minus the deadline),
duplicates and misses. Then the old design on the same data: a table of the same N waiting
leads scanned every 5 minutes, with the scan's real duration measured on PostgreSQL.

    .venv/bin/python -m bench.leakage --leads 100000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from bench.common import bench_environment, percentile, wait_ready, write_result
from schemas.events import InboundMessage
from schemas.topics import TopicNames
from streams.rules.identity import lead_id_for

THRESHOLD_S = 60
OLD_SCAN_INTERVAL_S = 300


async def produce(bootstrap: str, topic: str, tenant_id: str, count: int, start_s: float,
                  spread_s: float) -> dict[str, int]:  # fmt: skip
    """One message per lead; returns lead id → deadline (epoch ms)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024)  # fmt: skip
    await producer.start()
    deadlines: dict[str, int] = {}
    try:
        now = datetime.now(UTC)
        pending = []
        for i in range(count):
            contact = f"bench-{i:07d}"
            lead_id = lead_id_for(tenant_id, "webchat", contact)
            due_s = start_s + random.random() * spread_s
            occurred = datetime.fromtimestamp(due_s - THRESHOLD_S, tz=UTC)
            deadlines[lead_id] = int(due_s * 1000)
            event = InboundMessage(
                event_id=str(uuid.uuid4()), tenant_id=tenant_id, occurred_at=occurred,
                lead_id=lead_id, channel="webchat", contact=contact, text="hello?",
                received_at=now,
            )  # fmt: skip
            pending.append(await producer.send(topic, event.model_dump_json().encode(),
                                               key=lead_id.encode()))  # fmt: skip
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return deadlines


async def wait_ingested(dsn: str, tenant_id: str, expected: int, until_s: float) -> float:
    """When the worker has taken in every lead (its row written by the sink): the epoch time."""
    conn = await asyncpg.connect(dsn)
    try:
        while time.time() < until_s:
            count = await conn.fetchval(
                "SELECT count(*) FROM leads WHERE tenant_id = $1", tenant_id
            )
            if count >= expected:
                return time.time()
            await asyncio.sleep(0.5)
        return time.time()
    finally:
        await conn.close()


async def collect(dsn: str, tenant_id: str, expected: int, until_s: float) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch(
                """SELECT lead_id, (details->>'deadline_ms')::bigint AS deadline_ms,
                          (details->>'lateness_ms')::bigint AS lateness_ms
                   FROM lead_leakage_events WHERE tenant_id = $1""",
                tenant_id,
            )
            if len(rows) >= expected or time.time() > until_s:
                return rows
            await asyncio.sleep(2)
    finally:
        await conn.close()


async def old_design(dsn: str, deadlines: dict[str, int]) -> dict[str, float]:
    """The seed's cron: every 5 minutes, SELECT the leads whose deadline has passed."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TEMP TABLE waiting (lead_id uuid PRIMARY KEY, deadline_at timestamptz,"
            " answered boolean NOT NULL DEFAULT false)"
        )
        await conn.copy_records_to_table(
            "waiting",
            records=[(uuid.UUID(k), datetime.fromtimestamp(v / 1000, tz=UTC), False)
                     for k, v in deadlines.items()],
        )  # fmt: skip
        await conn.execute("ANALYZE waiting")
        started = time.perf_counter()
        for _ in range(5):
            await conn.fetch(
                "SELECT lead_id FROM waiting WHERE NOT answered AND deadline_at < now()"
            )
        scan_s = (time.perf_counter() - started) / 5
    finally:
        await conn.close()
    # Scans run every 5 minutes at a phase the deadlines do not know: lateness is the wait for
    # the next scan plus the scan itself, over many phases of the cron.
    lateness = []
    for phase in (random.random() * OLD_SCAN_INTERVAL_S for _ in range(20)):
        for due_ms in deadlines.values():
            since_phase = (due_ms / 1000 - phase) % OLD_SCAN_INTERVAL_S
            lateness.append((OLD_SCAN_INTERVAL_S - since_phase) * 1000 + scan_s * 1000)
    return {
        "p50_ms": round(statistics.median(lateness)),
        "p99_ms": round(percentile(lateness, 99)),
        "max_ms": round(max(lateness)),
        "scan_ms": round(scan_s * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=100_000)
    parser.add_argument("--spread-s", type=float, default=180)
    # The messages are produced at once; the worker must have taken them in (about 150 s for
    # 100,000 on this machine) before the first deadline, or the bench measures ingest, not
    # timers. In production a lead's message arrives a whole threshold before its deadline.
    parser.add_argument(
        "--lead-time-s", type=float, default=240, help="seconds before the first deadline"
    )
    args = parser.parse_args()
    with bench_environment() as environment:
        settings = environment.settings
        worker = environment.start(
            "worker", WORKER_WEB_PORT="16066", LEAK_THRESHOLD_S=str(THRESHOLD_S),
            ENABLE_AI_QUALIFICATION="false", ENABLE_COLD_RECOVERY="false",
            ENABLE_SLA_MONITORING="false",
        )  # fmt: skip
        try:
            wait_ready("http://127.0.0.1:16066/ready")
            start_s = time.time() + args.lead_time_s
            produced_at = time.time()
            topic = TopicNames(settings.topic_prefix).inbound_messages
            deadlines = asyncio.run(produce(
                settings.kafka_bootstrap_servers, topic, environment.tenant_id, args.leads,
                start_s, args.spread_s,
            ))  # fmt: skip
            print(f"produced {args.leads} messages in {time.time() - produced_at:.1f}s")
            ingested_at = asyncio.run(wait_ingested(
                settings.database_url, environment.tenant_id, args.leads, start_s + args.spread_s
            ))  # fmt: skip
            ingest_s = ingested_at - produced_at
            print(f"worker took them in after {ingest_s:.1f}s"
                  + (" - AFTER the first deadline: lateness includes ingest"
                     if ingested_at > start_s else ""))  # fmt: skip
            rows = asyncio.run(collect(settings.database_url, environment.tenant_id, args.leads,
                                       start_s + args.spread_s + 300))  # fmt: skip
            old = asyncio.run(old_design(settings.database_url, deadlines))
        finally:
            environment.stop(worker, timeout_s=60)
    fired: dict[str, int] = {}
    for row in rows:
        fired[str(row["lead_id"])] = fired.get(str(row["lead_id"]), 0) + 1
    lateness = [float(row["lateness_ms"]) for row in rows]
    result = {
        "leads": args.leads,
        "spread_s": args.spread_s,
        "lead_time_s": args.lead_time_s,
        "ingest_s": round(ingest_s, 1),
        "fired": len(rows),
        "duplicates": sum(n - 1 for n in fired.values() if n > 1),
        "misses": sum(1 for lead in deadlines if lead not in fired),
        "p50_ms": round(statistics.median(lateness)) if lateness else None,
        "p99_ms": round(percentile(lateness, 99)) if lateness else None,
        "max_ms": round(max(lateness)) if lateness else None,
        "old_scan_every_5_min": old,
    }
    path = write_result("leakage", result)
    print(f"{'design':<22} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'dups':>6} {'misses':>7}")
    print(f"{'per-lead timers':<22} {result['p50_ms']:>9} {result['p99_ms']:>9} "
          f"{result['max_ms']:>9} {result['duplicates']:>6} {result['misses']:>7}")  # fmt: skip
    print(f"{'SQL scan every 5 min':<22} {old['p50_ms']:>9} {old['p99_ms']:>9} {old['max_ms']:>9}"
          f" {'-':>6} {'-':>7}   (scan {old['scan_ms']} ms)")  # fmt: skip
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
