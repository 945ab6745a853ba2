"""Benchmark: what one `POST /api/events/inbound` costs the API, to the 202.

The API alone (no worker: accepting a message is validating it and waiting for Kafka's
acknowledgement), driven at a steady rate by the lean client of bench.freshness. Measured over
the steady part of the run: the API's CPU milliseconds per request (from /proc, steadier than
its latency on a shared two-core machine) and the 202's p50 and p99. The API's share of
freshness (c) at 1,000 messages/s is this CPU times the rate.

    .venv/bin/python -m bench.ingest --rate 800 --seconds 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import uvloop

from bench.common import bench_environment, cpu_seconds, percentile, wait_ready, write_result
from bench.http_load import LoadClient, at_steady_rate

WARM_UP_S = 2.0


async def post_at_rate(
    port: int, api_key: str, api_pid: int, rate: float, seconds: float
) -> tuple[list[float], float]:
    """(the 202s' latencies in ms, the API's CPU ms per request) of the measured part."""
    client = LoadClient("127.0.0.1", port, {"Authorization": f"Bearer {api_key}"})
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        body = {"channel": "sms", "contact": f"5553{i:06d}", "text": f"message {i}"}
        status, answer = await client.post_json("/api/events/inbound", body)
        if status != 202:
            raise RuntimeError(f"inbound message {i} answered {status}: {answer}")
        latencies.append((time.perf_counter() - started) * 1000)

    try:
        # Connections opened, the producer started and the API key cached before measuring.
        await at_steady_rate(rate, WARM_UP_S, one)
        latencies.clear()
        cpu_before = cpu_seconds(api_pid)
        await at_steady_rate(rate, seconds, one)
        cpu_ms = (cpu_seconds(api_pid) - cpu_before) * 1000 / len(latencies)
    finally:
        await client.close()
    return latencies, cpu_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=800, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with bench_environment() as environment:
        api = environment.start("api")
        port = environment.settings.api_port
        try:
            wait_ready(f"http://127.0.0.1:{port}/health")
            latencies, cpu_ms = uvloop.run(
                post_at_rate(port, environment.api_key, api.pid, args.rate, args.seconds)
            )
        finally:
            environment.stop(api)
    result = {
        "rate_per_s": args.rate,
        "requests": len(latencies),
        "api_cpu_ms_per_request": round(cpu_ms, 3),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }
    path = write_result("ingest", result)
    print(f"POST /api/events/inbound at {args.rate:.0f}/s: {cpu_ms:.3f} ms of API CPU per request, "
          f"202 p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms ({path})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
