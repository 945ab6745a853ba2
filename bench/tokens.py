"""Benchmark: token-usage events per second through the token-account table, one worker.

Produces N usage events (spread over T tenants, plus a share of exact duplicates) to the
token-usage topic *before* the worker starts, so the worker reads a backlog as fast as it
can; then polls the worker's `flexoraa_token_events` counters and reports the rate from the
first to the last event applied, and checks every tenant's balance against the expected one.

    .venv/bin/python -m bench.tokens --events 200000 --tenants 100
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer

from api.tenants import create_tenant
from bench.common import bench_environment, machine_facts, wait_ready, write_result
from schemas.tokens import TokenUsage
from schemas.topics import TopicNames

WORKER_PORT = 16066
_COUNTER = re.compile(r'^flexoraa_token_events_total\{kind="(\w+)"\} ([0-9.e+]+)$', re.M)


async def produce(
    bootstrap: str, topic: str, tenants: list[str], events: int, duplicate_share: float
) -> tuple[dict[str, int], int]:
    """Returns the tokens each tenant spent (duplicates not counted) and the records sent."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024)  # fmt: skip
    await producer.start()
    spent = dict.fromkeys(tenants, 0)
    sent = 0
    rng = random.Random(42)
    now = datetime.now(UTC)
    try:
        for _ in range(events):
            tenant = rng.choice(tenants)
            usage = TokenUsage(
                event_id=str(uuid.uuid4()), tenant_id=tenant, occurred_at=now,
                feature="qualification", lead_id=str(uuid.uuid4()), model="gpt-4o-mini",
                prompt_tokens=rng.randint(100, 900), completion_tokens=rng.randint(20, 200),
                tokens=rng.randint(1, 3),
            )  # fmt: skip
            value = usage.model_dump_json().encode()
            copies = 2 if rng.random() < duplicate_share else 1
            for _ in range(copies):
                await producer.send(topic, key=tenant.encode(), value=value)
                sent += 1
            spent[tenant] += usage.tokens
        await producer.flush()
    finally:
        await producer.stop()
    return spent, sent


async def create_tenants(database_url: str, count: int) -> list[str]:
    """Real tenants (no tokens): their threshold alerts are stored like any tenant's."""
    conn = await asyncpg.connect(database_url)
    try:
        return [(await create_tenant(conn, f"bench-{i}")).tenant_id for i in range(count)]
    finally:
        await conn.close()


def applied(metrics_text: str) -> float:
    return sum(float(value) for _, value in _COUNTER.findall(metrics_text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--duplicates", type=float, default=0.05, help="share sent twice")
    args = parser.parse_args()
    with bench_environment(worker_port=WORKER_PORT) as environment:
        settings = environment.settings
        tenants = asyncio.run(create_tenants(settings.database_url, args.tenants))
        spent, records = asyncio.run(
            produce(settings.kafka_bootstrap_servers, TopicNames(settings.topic_prefix).token_usage,
                    tenants, args.events, args.duplicates)
        )  # fmt: skip
        print(f"produced {records} usage records ({args.events} distinct) for {args.tenants} "
              "tenants; starting the worker")  # fmt: skip
        worker = environment.start(
            "worker", WORKER_WEB_PORT=str(WORKER_PORT), ENABLE_AI_QUALIFICATION="false",
            ENABLE_COLD_RECOVERY="false", ENABLE_LEAKAGE_PREVENTION="false",
            ENABLE_SLA_MONITORING="false",
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{WORKER_PORT}"
            wait_ready(f"{url}/ready")
            samples: list[tuple[float, float]] = []
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                done = applied(httpx.get(f"{url}/metrics", timeout=5).text)
                samples.append((time.monotonic(), done))
                if done >= records:
                    break
                time.sleep(0.1)
            started = next(t for t, n in samples if n > 0)
            finished = samples[-1][0]
            balances = {
                t: httpx.get(f"{url}/internal/tenants/{t}/tokens", timeout=5).json()["balance"]
                for t in tenants
            }
        finally:
            environment.stop(worker)
    wrong = sum(1 for t in tenants if balances[t] != -spent[t])
    elapsed = max(finished - started, 1e-9)
    result = {
        "events_distinct": args.events,
        "records": records,
        "tenants": args.tenants,
        "seconds": round(elapsed, 2),
        "records_per_s": round(records / elapsed),
        "wrong_balances": wrong,
        "machine": machine_facts(),
    }
    path = write_result("tokens", result)
    print(f"{records} token records in {elapsed:.1f} s: {records / elapsed:,.0f}/s per worker; "
          f"wrong balances: {wrong}  ({path})")  # fmt: skip
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
