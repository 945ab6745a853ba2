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
import statistics
import time

import uvloop

from bench.common import (
    bench_environment,
    pauses,
    pauses_between,
    percentile,
    wait_ready,
    write_result,
)
from bench.http_load import LoadClient, at_steady_rate


async def measure(host: str, port: int, api_key: str, rate: float, seconds: float) -> list[float]:
    # A lean client (bench.http_load) drives the load: it runs on the two cores it measures,
    # and aiohttp took 0.3 of them at 1,000 messages a second.
    client = LoadClient(host, port, {"Authorization": f"Bearer {api_key}"})
    latencies: list[float] = []
    # Every message is load; about 20 a second are probed, so the probes' polling does not
    # become the load it measures.
    probe_every = max(1, round(rate / 20))

    async def one(i: int) -> None:
        body = {"channel": "sms", "contact": f"5552{i:06d}", "text": f"message {i}"}
        status, answer = await client.post_json("/api/events/inbound", body)
        if status != 202:
            raise RuntimeError(f"inbound message {i} answered {status}: {answer}")
        accepted = time.perf_counter()
        if i % probe_every:
            return
        lead_path = f"/api/leads/{answer['lead_id']}"
        while True:
            status, _ = await client.request("GET", lead_path)
            if status == 200:
                latencies.append((time.perf_counter() - accepted) * 1000)
                return
            waited = time.perf_counter() - accepted
            if waited > 30:
                raise RuntimeError(f"lead {lead_path} never became visible")
            # Every 5 ms while a probe is young, then a tenth of its age: a saturated
            # system's probes (seconds late, dozens in flight) polling every 5 ms sent more
            # reads than the load's own writes, and that feedback is what was measured.
            # The error stays within 10 % and the 5 ms resolution holds up to 50 ms.
            await asyncio.sleep(max(0.005, waited / 10))

    try:
        await at_steady_rate(rate, seconds, one)
    finally:
        await client.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=200, help="messages per second")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()

    worker_ports = [16066 + i for i in range(args.workers)]
    with bench_environment(worker_port=worker_ports[0]) as environment:
        children = [environment.start("worker", WORKER_WEB_PORT=str(port)) for port in worker_ports]
        children.append(environment.start("api"))
        api_port = environment.settings.api_port
        try:
            for port in worker_ports:
                wait_ready(f"http://127.0.0.1:{port}/ready")
            time.sleep(3 if args.workers > 1 else 0)  # let the last rebalance settle
            for port in worker_ports:
                wait_ready(f"http://127.0.0.1:{port}/ready")
            wait_ready(f"http://127.0.0.1:{api_port}/health")
            processes = {f"worker {port}": f"http://127.0.0.1:{port}" for port in worker_ports}
            processes["api"] = f"http://127.0.0.1:{api_port}"
            before = {name: pauses(url) for name, url in processes.items()}
            latencies = uvloop.run(
                measure("127.0.0.1", api_port, environment.api_key, args.rate, args.seconds)
            )
            paused = {name: pauses_between(before[name], pauses(url))
                      for name, url in processes.items()}  # fmt: skip
        finally:
            environment.stop(*children)

    result = {
        "workers": args.workers,
        "rate_per_s": args.rate,
        "messages": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "within_1s": sum(1 for value in latencies if value <= 1000) / len(latencies),
        # Garbage collection and blocked-loop time in each process during the measurement.
        "pauses": paused,
    }
    path = write_result(f"freshness-{args.workers}w", result)
    header = ("workers", "rate/s", "n", "p50 ms", "p99 ms", "max ms", "<=1s")
    print("{:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>6}".format(*header))
    print(
        f"{args.workers:>8} {args.rate:>8.0f} {result['messages']:>6} {result['p50_ms']:>8} "
        f"{result['p99_ms']:>8} {result['max_ms']:>8} {result['within_1s']:>6.1%}"
    )
    print(f"pauses during the measurement: {paused}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
