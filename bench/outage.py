"""Benchmark: what a broker outage costs the processes that stay up.

Starts a worker and the API (own topic prefix and database), posts inbound messages at a
steady rate, stops the local broker for `--seconds` while the load goes on, and reports each
process's CPU (from /proc) over the outage and how many metadata updates failed, then starts
the broker again. A client that retries without a pause shows here as a busy core.

    .venv/bin/python -m bench.outage --rate 100 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import Counter

import httptools
import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import bench_environment, cpu_seconds, wait_ready, write_result
from bench.http_load import LoadClient
from flexoraa import stack
from flexoraa.settings import Settings

WORKER_PORT = 16066


async def post_until(
    host: str, port: int, api_key: str, rate: float, stop: threading.Event
) -> Counter[str]:
    """Posts inbound messages at `rate` until `stop` is set; the answers' statuses counted."""
    client = LoadClient(host, port, {"Authorization": f"Bearer {api_key}"})
    statuses: Counter[str] = Counter()

    async def one(i: int) -> None:
        body = {"channel": "sms", "contact": f"5553{i:06d}", "text": f"message {i}"}
        try:
            status, _ = await client.post_json("/api/events/inbound", body)
            statuses[str(status)] += 1
        # A lost connection, a broken answer: counted, and the load goes on.
        except (OSError, ValueError, httptools.HttpParserError) as exc:
            statuses[type(exc).__name__] += 1

    tasks = []
    started = time.perf_counter()
    i = 0
    try:
        while not stop.is_set():
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return statuses


def metadata_failures(url: str) -> float:
    page = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "flexoraa_kafka_metadata_failures_total"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100, help="messages per second")
    parser.add_argument("--seconds", type=float, default=15, help="how long the broker is down")
    args = parser.parse_args()

    broker = Settings()
    with bench_environment(worker_port=WORKER_PORT) as environment:
        worker = environment.start("worker", WORKER_WEB_PORT=str(WORKER_PORT))
        api = environment.start("api")
        api_url = f"http://127.0.0.1:{environment.settings.api_port}"
        urls = {"worker": f"http://127.0.0.1:{WORKER_PORT}", "api": api_url}
        pids = {"worker": worker.pid, "api": api.pid}
        wait_ready(f"{urls['worker']}/ready")
        wait_ready(f"{api_url}/health")
        stop = threading.Event()
        statuses: Counter[str] = Counter()

        def load() -> None:
            statuses.update(
                asyncio.run(
                    post_until(
                        "127.0.0.1",
                        environment.settings.api_port,
                        environment.api_key,
                        args.rate,
                        stop,
                    )
                )
            )

        loader = threading.Thread(target=load)
        loader.start()
        try:
            time.sleep(5)  # the worker busy with the load when the broker goes
            # The broker of the local stack (the environment's settings name its own directory).
            stopped = stack.stop_kafka(broker)
            if stopped.running:
                raise RuntimeError(f"the broker is still running: {stopped.detail}")
            time.sleep(2)  # past the stop itself
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            failures_before = {name: metadata_failures(url) for name, url in urls.items()}
            measured_from = time.monotonic()
            time.sleep(args.seconds)
            cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            failures_after = {name: metadata_failures(url) for name, url in urls.items()}
            measured_s = time.monotonic() - measured_from
        finally:
            stop.set()
            try:
                stack.start_kafka(broker)  # first: whatever happens to the load, the broker returns
            finally:
                loader.join(timeout=60)
        alive = {"worker": worker.poll() is None, "api": api.poll() is None}

    cpu = {name: round((cpu_after[name] - cpu_before[name]) / measured_s, 3) for name in pids}
    failures = {
        name: round((failures_after[name] - failures_before[name]) / measured_s, 1) for name in urls
    }
    result = {
        "rate_per_s": args.rate,
        "outage_s": args.seconds,
        "cpu_cores_during_outage": cpu,
        "failed_metadata_updates_per_s": failures,
        "answers": dict(statuses),
        "alive_after": alive,
    }
    path = write_result("outage", result)
    print(f"{'process':>8} {'cores':>6} {'failed metadata updates/s':>26}")
    for name in ("worker", "api"):
        print(f"{name:>8} {cpu[name]:>6} {failures[name]:>26.1f}")
    print(f"answers: {dict(statuses)}  alive after: {alive}")
    print(f"written {path}")
    return 0 if all(alive.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
