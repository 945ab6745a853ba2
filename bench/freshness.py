"""Benchmark: how fresh is live state? From the API's 202 to the lead visible through the API.

Starts the local stack, N workers and the API as `make run` does (own topic prefix and
database), posts inbound messages at a steady rate, and for each one polls
`GET /api/leads/{id}` until the new message count is visible. Prints a table and writes JSON
with the machine's facts under bench/results/; the table also gives the time of the read that
saw the state (part of the figure: under load it queues as the messages do).

Several rates are measured one after another against the same processes (new leads each
time), the table giving for each the CPU every process used and whether p99 met
`--target-ms`: where the target stops holding, and which process took the cores.

    .venv/bin/python -m bench.freshness --workers 1 --rate 200 --seconds 20
    .venv/bin/python -m bench.freshness --workers 1 --rate 400 600 800 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench.common import (
    bench_environment,
    cpu_seconds,
    pauses,
    pauses_between,
    percentile,
    tree_cpu_seconds,
    wait_ready,
    write_result,
)
from bench.http_load import LoadClient, at_steady_rate
from flexoraa import stack
from flexoraa.settings import Settings


@dataclass
class Probes:
    """Per probed message: ms from its 202 until a read saw it, and how long that read took.

    The read is part of the figure (the state is visible once a read returns it), and under
    load it is no longer small: it queues in the API's and the worker's event loops as the
    messages do. Reported apart, it says how much of a tail is the read and how much the
    pipeline."""

    visible_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)


async def measure(
    host: str, port: int, api_key: str, rate: float, seconds: float, first_lead: int = 0
) -> Probes:
    # A lean client (bench.http_load) drives the load: it runs on the two cores it measures,
    # and aiohttp took 0.3 of them at 1,000 messages a second.
    client = LoadClient(host, port, {"Authorization": f"Bearer {api_key}"})
    probes = Probes()
    # Every message is load; about 20 a second are probed, so the probes' polling does not
    # become the load it measures.
    probe_every = max(1, round(rate / 20))

    async def one(i: int) -> None:
        body = {"channel": "sms", "contact": f"555{first_lead + i:07d}", "text": f"message {i}"}
        status, answer = await client.post_json("/api/events/inbound", body)
        if status != 202:
            raise RuntimeError(f"inbound message {i} answered {status}: {answer}")
        accepted = time.perf_counter()
        if i % probe_every:
            return
        lead_path = f"/api/leads/{answer['lead_id']}"
        while True:
            read_started = time.perf_counter()
            status, _ = await client.request("GET", lead_path)
            if status == 200:
                seen = time.perf_counter()
                probes.visible_ms.append((seen - accepted) * 1000)
                probes.read_ms.append((seen - read_started) * 1000)
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
    return probes


# Between two rates: the backlog a saturated rate left is worked off before the next starts.
_SETTLE_S = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=float, nargs="+", default=[200.0],
                        help="messages per second; several are measured in turn")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--target-ms", type=float, default=50, help="the p99 to meet")
    args = parser.parse_args()

    worker_ports = [16066 + i for i in range(args.workers)]
    results = []
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
            measured = {name: child.pid for name, child in zip(processes, children, strict=True)}
            # The stack's servers, which the run's own settings (another directory) do not find.
            servers = Settings()
            broker = stack.kafka_status(servers).pid
            database = stack.postgres_status(servers).pid
            for index, rate in enumerate(args.rate):
                if index:
                    time.sleep(_SETTLE_S)
                before = {name: pauses(url) for name, url in processes.items()}
                cpu_before = _cpu(measured, broker, database)
                started = time.monotonic()
                probes = uvloop.run(
                    measure("127.0.0.1", api_port, environment.api_key, rate, args.seconds,
                            first_lead=index * 1_000_000)
                )  # fmt: skip
                elapsed = time.monotonic() - started
                cpu_after = _cpu(measured, broker, database)
                paused = {name: pauses_between(before[name], pauses(url))
                          for name, url in processes.items()}  # fmt: skip
                cores = {name: round((cpu_after[name] - cpu_before[name]) / elapsed, 3)
                         for name in cpu_after}  # fmt: skip
                results.append(_result(args.workers, rate, probes, paused, cores))
        finally:
            environment.stop(*children)

    header = ("workers", "rate/s", "n", "p50 ms", "p99 ms", "max ms", "read p50/p99", "<=1s",
              "p99 met", "cores")  # fmt: skip
    print("{:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>13} {:>6} {:>7}  {}".format(*header))
    for result in results:
        met = "yes" if result["p99_ms"] <= args.target_ms else "no"
        spent = ", ".join(f"{name} {value:.2f}" for name, value in result["cpu_cores"].items())
        reads = f"{result['read_p50_ms']:.1f}/{result['read_p99_ms']:.1f}"
        print(
            f"{args.workers:>8} {result['rate_per_s']:>8.0f} {result['messages']:>6} "
            f"{result['p50_ms']:>8} {result['p99_ms']:>8} {result['max_ms']:>8} "
            f"{reads:>13} {result['within_1s']:>6.1%} {met:>7}  {spent}"
        )
    for result in results:
        print(f"pauses at {result['rate_per_s']:.0f}/s: {result['pauses']}")
        name = f"freshness-{args.workers}w-{result['rate_per_s']:.0f}"
        print(f"written {write_result(name, result)}")
    return 0


def _cpu(measured: dict[str, int], broker: int | None, database: int | None) -> dict[str, float]:
    """CPU seconds so far of each process on the machine's two cores, this one included (it
    drives the load)."""
    used = {name: cpu_seconds(pid) for name, pid in measured.items()}
    if broker is not None:
        used["broker"] = cpu_seconds(broker)
    if database is not None:
        used["postgresql"] = tree_cpu_seconds(database)
    used["load generator"] = time.process_time()
    return used


def _result(
    workers: int,
    rate: float,
    probes: Probes,
    paused: dict[str, dict[str, float]],
    cores: dict[str, float],
) -> dict[str, Any]:
    latencies = probes.visible_ms
    return {
        "workers": workers,
        "rate_per_s": rate,
        "messages": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        # The read that saw the state: its own time, from its request to its answer.
        "read_p50_ms": round(statistics.median(probes.read_ms), 2),
        "read_p99_ms": round(percentile(probes.read_ms, 99), 2),
        "within_1s": sum(1 for value in latencies if value <= 1000) / len(latencies),
        # Garbage collection and blocked-loop time in each process during the measurement.
        "pauses": paused,
        # Cores each process used while the load ran, and their sum.
        "cpu_cores": {**cores, "total": round(sum(cores.values()), 3)},
    }


if __name__ == "__main__":
    raise SystemExit(main())
