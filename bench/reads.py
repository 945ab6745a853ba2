"""Benchmark (e): `GET /api/leads/{id}` latency at a steady request rate, (g) the worker's
memory per 100,000 tracked leads, and how long a restarted worker takes to rebuild them.

N leads are produced straight to Kafka; one worker (AI off: the tables under test are sessions,
deadlines and leakage) applies them, its resident memory is read before and after; then the
API is asked for random leads at a fixed rate, each answer a live table read routed to the
partition owner. Last, the worker is stopped and a new one started: tables live in memory
(`TABLE_STORE=memory://`), so it replays every changelog before `/ready` answers 200, the time
a deploy or a crash keeps those partitions from being served.

    .venv/bin/python -m bench.reads --leads 100000 --rate 500 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import time
from pathlib import Path

import httptools
import httpx
import uvloop

from bench.common import (
    bench_environment,
    cpu_seconds,
    pauses,
    pauses_between,
    percentile,
    wait_ready,
    write_result,
)
from bench.http_load import LoadClient, at_steady_rate
from bench.throughput import produce, records_written
from schemas.topics import TopicNames
from streams.rules.identity import lead_id_for

WORKER_PORT = 16066


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def applied(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^flexoraa_inbound_events_total\{[^}]*\} (\S+)$",
                                            text, re.M))  # fmt: skip


async def read_at_rate(
    host: str, port: int, api_key: str, lead_ids: list[str], rate: float, seconds: float
) -> tuple[list[float], int]:
    # A lean client drives the load (bench.http_load, as in bench.freshness): with httpx this
    # process took a whole core at 500 requests/s and its own queueing became the latency
    # measured (p50 104 s).
    latencies: list[float] = []
    errors = 0
    client = LoadClient(host, port, {"Authorization": f"Bearer {api_key}"}, max_connections=64)

    async def one(_: int) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            async with asyncio.timeout(10):
                status, _body = await client.request("GET", f"/api/leads/{random.choice(lead_ids)}")
            ok = status == 200
        except (OSError, TimeoutError, httptools.HttpParserError):
            ok = False
        if ok:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            errors += 1

    try:
        await at_steady_rate(rate, seconds, one)
    finally:
        await client.close()
    return latencies, errors


def leads_readable(url: str, lead_ids: list[str], sample: int = 200) -> bool:
    """Whether a sample of the leads is in the worker's tables."""
    return all(
        httpx.get(f"{url}/internal/leads/{lead_id}", timeout=30).status_code == 200
        for lead_id in random.sample(lead_ids, min(sample, len(lead_ids)))
    )


def changelog_records(bootstrap: str, prefix: str) -> int:
    names = TopicNames(prefix)
    written = asyncio.run(records_written(bootstrap, prefix))
    return sum(written[topic] for topic in names.changelogs())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    env = {"ENABLE_AI_QUALIFICATION": "false", "ENABLE_SLA_MONITORING": "false",
           "WORKER_WEB_PORT": str(WORKER_PORT)}  # fmt: skip
    with bench_environment(worker_port=WORKER_PORT) as environment:
        settings = environment.settings
        worker = environment.start("worker", **env)
        api = environment.start("api")
        url = f"http://127.0.0.1:{WORKER_PORT}"
        try:
            wait_ready(f"{url}/ready")
            wait_ready(f"http://127.0.0.1:{settings.api_port}/health")
            idle_mb = resident_mb(worker.pid)
            topic = TopicNames(settings.topic_prefix).inbound_messages
            asyncio.run(produce(settings.kafka_bootstrap_servers, topic, environment.tenant_id,
                                args.leads))  # fmt: skip
            while applied(url) < args.leads:
                time.sleep(1)
            time.sleep(3)
            loaded_mb = resident_mb(worker.pid)
            lead_ids = [lead_id_for(environment.tenant_id, "whatsapp", f"+91980{i:07d}")
                        for i in range(args.leads)]  # fmt: skip
            # The other agents (sinks, leakage, recovery) are still working through the backlog
            # after the sessions table has it: measure reads on a settled worker.
            settled_for = 0
            while settled_for < 5:
                started = time.perf_counter()
                httpx.get(f"{url}/internal/leads/{random.choice(lead_ids)}", timeout=60)
                settled_for = settled_for + 1 if time.perf_counter() - started < 0.05 else 0
                time.sleep(0.5)
            api_url = f"http://127.0.0.1:{settings.api_port}"
            before = {"worker": pauses(url), "api": pauses(api_url)}
            pids = {"api": api.pid, "worker": worker.pid}
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            latencies, errors = uvloop.run(
                read_at_rate("127.0.0.1", settings.api_port, environment.api_key,
                             lead_ids, args.rate, args.seconds)
            )  # fmt: skip
            requests = len(latencies) + errors
            cpu_ms = {name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / requests
                      for name, pid in pids.items()}  # fmt: skip
            paused = {name: pauses_between(before[name], pauses(where))
                      for name, where in (("worker", url), ("api", api_url))}  # fmt: skip
            replayed = changelog_records(settings.kafka_bootstrap_servers, settings.topic_prefix)
            environment.stop(worker)
            restarted = time.perf_counter()
            worker = environment.start("worker", **env)
            wait_ready(f"{url}/ready", timeout_s=600)
            recovery_s = time.perf_counter() - restarted
            if not leads_readable(url, lead_ids):
                raise RuntimeError("the restarted worker is ready without the leads' state")
        finally:
            environment.stop(api, worker)
    per_100k = (loaded_mb - idle_mb) * 100_000 / args.leads
    result = {
        "leads": args.leads,
        "worker_rss_idle_mb": round(idle_mb, 1),
        "worker_rss_loaded_mb": round(loaded_mb, 1),
        "mb_per_100k_leads": round(per_100k, 1),
        "rate_per_s": args.rate,
        "reads": len(latencies),
        "errors": errors,
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "p99_9_ms": round(percentile(latencies, 99.9), 2),
        # CPU milliseconds per read: the API answering it, the worker serving its table read.
        "api_cpu_ms_per_read": round(cpu_ms["api"], 3),
        "worker_cpu_ms_per_read": round(cpu_ms["worker"], 3),
        # Garbage collection and blocked-loop time in each process during the reads.
        "pauses": paused,
        # From the new worker's start to its /ready (polled every 0.3 s).
        "restart_ready_s": round(recovery_s, 1),
        "changelog_records": replayed,
    }
    path = write_result("reads", result)
    print(f"(g) worker memory: {idle_mb:.0f} MB idle, {loaded_mb:.0f} MB with {args.leads} leads "
          f"= {per_100k:.0f} MB per 100k leads")  # fmt: skip
    print(f"(e) GET /api/leads/{{id}} at {args.rate:.0f}/s: p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms, p99.9 {result['p99_9_ms']} ms, errors {errors}; "
          f"CPU per read: API {cpu_ms['api']:.3f} ms, worker {cpu_ms['worker']:.3f} ms  "
          f"({path})")  # fmt: skip
    print(f"    pauses during the reads: {paused}")
    print(
        f"(h) a restarted worker is ready in {recovery_s:.1f} s, replaying {replayed:,} "
        f"changelog records ({replayed / recovery_s:,.0f}/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
