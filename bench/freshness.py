"""Benchmark: how fresh is live state? From the API's 202 to the lead visible through the API.

Starts the local stack, N workers and the API as `make run` does (own topic prefix and
database), posts inbound messages at a steady rate, and for each one polls
`GET /api/leads/{id}` until the new message count is visible. Prints a table and writes JSON
with the machine's facts under bench/results/.

    .venv/bin/python -m bench.freshness --workers 1 --rate 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import httpx

from api.tenants import create_tenant
from flexoraa import stack
from flexoraa.kafka import delete_topics, ensure_topics
from flexoraa.settings import PROJECT_ROOT, Settings
from schemas.migrate import migrate

RESULTS = PROJECT_ROOT / "bench" / "results"


def machine_facts() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TOPIC_PREFIX": settings.topic_prefix,
        "DATABASE_URL": settings.database_url,
        "STACK_DIR": str(settings.stack_dir),
        "WORKER_URL": settings.worker_url,
        "API_PORT": str(settings.api_port),
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def _wait(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready")


async def measure(base: str, api_key: str, rate: float, seconds: float) -> list[float]:
    # aiohttp, not httpx, drives the load: on two cores httpx's own CPU use became the
    # bottleneck it was supposed to measure.
    headers = {"Authorization": f"Bearer {api_key}"}
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector) as client:
        # Every message is load; about 20 a second are probed, so the probes' polling does not
        # become the load it measures.
        probe_every = max(1, round(rate / 20))

        async def one(i: int) -> None:
            body = {"channel": "sms", "contact": f"5552{i:06d}", "text": f"message {i}"}
            async with client.post("/api/events/inbound", json=body) as response:
                response.raise_for_status()
                lead_id = (await response.json())["lead_id"]
            accepted = time.perf_counter()
            if i % probe_every:
                return
            while True:
                async with client.get(f"/api/leads/{lead_id}") as state:
                    await state.read()
                    if state.status == 200:
                        latencies.append((time.perf_counter() - accepted) * 1000)
                        return
                if time.perf_counter() - accepted > 30:
                    raise RuntimeError(f"lead {lead_id} never became visible")
                await asyncio.sleep(0.005)

        tasks = []
        interval = 1 / rate
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return latencies


async def cleanup(settings: Settings, base_settings: Settings, database: str) -> None:
    await delete_topics(settings)
    admin = await asyncpg.connect(
        host="127.0.0.1", port=base_settings.postgres_port, user="postgres", database="postgres"
    )
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=200, help="messages per second")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()

    base_settings = Settings()
    stack.stack_up(base_settings)
    run_id = uuid.uuid4().hex[:8]
    database = f"flexoraa_bench_{run_id}"

    async def prepare() -> str:
        admin = await asyncpg.connect(
            host="127.0.0.1", port=base_settings.postgres_port, user="postgres", database="postgres"
        )
        await admin.execute(f'CREATE DATABASE "{database}" OWNER flexoraa')
        await admin.close()
        await migrate(settings.database_url)
        await ensure_topics(settings)
        conn = await asyncpg.connect(settings.database_url)
        tenant = await create_tenant(conn, "bench")
        await conn.close()
        return tenant.api_key

    api_port = 18000
    worker_ports = [16066 + i for i in range(args.workers)]
    settings = base_settings.model_copy(
        update={
            "topic_prefix": f"bench-{run_id}",
            "database_url": base_settings.database_url.rsplit("/", 1)[0] + f"/{database}",
            "stack_dir": PROJECT_ROOT / ".stack" / f"bench-{run_id}",
            "api_port": api_port,
            "worker_url": f"http://127.0.0.1:{worker_ports[0]}",
        }
    )
    api_key = asyncio.run(prepare())
    python = [sys.executable, "-m", "flexoraa"]
    children = [
        subprocess.Popen([*python, "worker"], env=_env(settings, WORKER_WEB_PORT=str(port)))
        for port in worker_ports
    ]
    children.append(subprocess.Popen([*python, "api"], env=_env(settings)))
    try:
        for port in worker_ports:
            _wait(f"http://127.0.0.1:{port}/ready")
        time.sleep(3 if args.workers > 1 else 0)  # let the last rebalance settle
        for port in worker_ports:
            _wait(f"http://127.0.0.1:{port}/ready")
        _wait(f"http://127.0.0.1:{api_port}/health")
        latencies = asyncio.run(
            measure(f"http://127.0.0.1:{api_port}", api_key, args.rate, args.seconds)
        )
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(timeout=30)
        asyncio.run(cleanup(settings, base_settings, database))

    result = {
        "benchmark": "freshness",
        "at": datetime.now(UTC).isoformat(),
        "machine": machine_facts(),
        "workers": args.workers,
        "rate_per_s": args.rate,
        "messages": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "within_1s": sum(1 for value in latencies if value <= 1000) / len(latencies),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"freshness-{args.workers}w-{run_id}.json"
    path.write_text(json.dumps(result, indent=2))
    header = ("workers", "rate/s", "n", "p50 ms", "p99 ms", "max ms", "<=1s")
    print("{:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>6}".format(*header))
    print(
        f"{args.workers:>8} {args.rate:>8.0f} {result['messages']:>6} {result['p50_ms']:>8} "
        f"{result['p99_ms']:>8} {result['max_ms']:>8} {result['within_1s']:>6.1%}"
    )
    print(f"written {path.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
