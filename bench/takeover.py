"""Benchmark: how long a killed worker's partitions go unserved, and what the survivor replays.

Two workers share N leads (produced straight to Kafka, one message each). One is killed with
SIGKILL; the survivor notices when the group's session times out, takes the partitions over and
replays their changelogs. Measured: the time from the kill until the survivor's `/ready`
answers 200 again after it went unready, and the changelog records it replayed meanwhile
(`flexoraa_changelog_records_replayed_total`). `--standby` sets WORKER_STANDBY_REPLICAS, to
see what a copy of the other worker's tables saves (with `memory://` tables: nothing).

    .venv/bin/python -m bench.takeover --leads 100000 --standby 0
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time

import httpx

from bench.common import bench_environment, wait_ready, write_result
from bench.throughput import positive_int, produce
from schemas.topics import TopicNames

SURVIVOR_PORT, VICTIM_PORT = 16066, 16067
SESSION_TIMEOUT_S = 6


def counter(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=positive_int, default=100_000)
    parser.add_argument("--standby", type=int, choices=(0, 1), default=0)
    args = parser.parse_args()
    env = {
        "ENABLE_AI_QUALIFICATION": "false",
        "ENABLE_SLA_MONITORING": "false",
        "WORKER_STANDBY_REPLICAS": str(args.standby),
        "WORKER_SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
    }
    with bench_environment(worker_port=SURVIVOR_PORT) as environment:
        settings = environment.settings
        survivor = environment.start("worker", WORKER_WEB_PORT=str(SURVIVOR_PORT), **env)
        victim = environment.start("worker", WORKER_WEB_PORT=str(VICTIM_PORT), **env)
        try:
            for port in (SURVIVOR_PORT, VICTIM_PORT):
                wait_ready(f"http://127.0.0.1:{port}/ready")
            topic = TopicNames(settings.topic_prefix).inbound_messages
            asyncio.run(produce(settings.kafka_bootstrap_servers, topic, environment.tenant_id,
                                args.leads))  # fmt: skip
            applied = "flexoraa_inbound_events_total"
            while counter(SURVIVOR_PORT, applied) + counter(VICTIM_PORT, applied) < args.leads:
                time.sleep(1)
            time.sleep(5)  # the changelog writes behind the last events
            replayed_before = counter(SURVIVOR_PORT, "flexoraa_changelog_records_replayed_total")
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed = time.perf_counter()
            # Unready while it rebalances and replays, then ready with every partition.
            went_unready = False
            while time.perf_counter() - killed < 300:
                if not ready(SURVIVOR_PORT):
                    went_unready = True
                elif went_unready:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("the survivor did not take the partitions over in 300 s")
            serving_after_s = time.perf_counter() - killed
            replayed = (
                counter(SURVIVOR_PORT, "flexoraa_changelog_records_replayed_total")
                - replayed_before
            )
        finally:
            environment.stop(survivor, victim)
    result = {
        "leads": args.leads,
        "standby_replicas": args.standby,
        "session_timeout_s": SESSION_TIMEOUT_S,
        "serving_after_kill_s": round(serving_after_s, 1),
        "changelog_records_replayed": int(replayed),
    }
    path = write_result("takeover", result)
    print(f"takeover with {args.standby} standby copies: the survivor serves every partition "
          f"{serving_after_s:.1f} s after the kill (session timeout {SESSION_TIMEOUT_S} s), "
          f"having replayed {int(replayed):,} changelog records  ({path})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
