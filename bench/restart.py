"""Benchmark: a restarted worker's replay when its leads have long histories, and what the
compaction of its changelogs saves.

N leads each get M messages, produced straight to Kafka in M rounds a little over a segment's
age apart (so each round's changelog writes roll the segments the previous one filled). One
worker (AI off) applies them; the log cleaner is given `--settle-s` to compact what rolled;
then the worker is stopped and a new one started. Tables live in memory, so it replays every
changelog record left before `/ready` answers 200. Measured: records written to the
changelogs, records left after compaction, records the new worker replayed
(`flexoraa_changelog_records_replayed_total`) and its time to ready.

`--segment-ms` is CHANGELOG_SEGMENT_MS for the run. Kafka's own default, 604800000 (7 days),
shows the replay before this project set it; a few seconds shows what the 10-minute default
does to a history older than 10 minutes, in a run that lasts a few minutes.

    .venv/bin/python -m bench.restart --leads 10000 --messages 10 --segment-ms 3000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.common import bench_environment, wait_ready, write_result
from bench.takeover import counter
from bench.throughput import positive_int, produce
from schemas.topics import TopicNames

WORKER_PORT = 16066
REPLAYED = "flexoraa_changelog_records_replayed_total"


async def changelog_records(bootstrap: str, topics: list[str], partitions: int) -> tuple[int, int]:
    """(records left in the changelogs, records ever written to them)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=4 << 20
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for topic in topics for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        left = 0
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=50_000)
                left += sum(len(records) for records in fetched.values())
        return left, sum(ends.values())
    finally:
        await consumer.stop()


def segment_ms(text: str) -> int:
    value = int(text)
    if value < 1000:  # the settings' lower bound
        raise argparse.ArgumentTypeError("at least 1000")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=positive_int, default=10_000)
    parser.add_argument("--messages", type=positive_int, default=10, help="messages per lead")
    parser.add_argument("--segment-ms", type=segment_ms, default=3000)
    parser.add_argument(
        "--settle-s", type=float, default=40, help="time given to the log cleaner (every 15 s)"
    )
    args = parser.parse_args()
    # Rounds a segment's age apart, so each round's writes roll the segments; a segment
    # longer than a minute does not roll in a run at all.
    round_gap_s = args.segment_ms / 1000 + 0.5 if args.segment_ms <= 60_000 else 0.0
    # Read by the settings of the topics' creation (bench_environment) and of the worker.
    os.environ["CHANGELOG_SEGMENT_MS"] = str(args.segment_ms)
    env = {"ENABLE_AI_QUALIFICATION": "false", "ENABLE_SLA_MONITORING": "false",
           "WORKER_WEB_PORT": str(WORKER_PORT)}  # fmt: skip
    url = f"http://127.0.0.1:{WORKER_PORT}"
    with bench_environment(worker_port=WORKER_PORT) as environment:
        settings = environment.settings
        names = TopicNames(settings.topic_prefix)
        bootstrap = settings.kafka_bootstrap_servers
        worker = environment.start("worker", **env)
        try:
            wait_ready(f"{url}/ready")
            for round_ in range(1, args.messages + 1):
                asyncio.run(produce(bootstrap, names.inbound_messages, environment.tenant_id,
                                    args.leads))  # fmt: skip
                while counter(WORKER_PORT, "flexoraa_inbound_events_total") < round_ * args.leads:
                    time.sleep(0.5)
                time.sleep(round_gap_s)
            time.sleep(args.settle_s)
            left, written = asyncio.run(
                changelog_records(bootstrap, names.changelogs(), settings.kafka_partitions)
            )
            environment.stop(worker)
            restarted = time.perf_counter()
            worker = environment.start("worker", **env)
            wait_ready(f"{url}/ready", timeout_s=900)
            ready_s = time.perf_counter() - restarted
            replayed = counter(WORKER_PORT, REPLAYED)
        finally:
            environment.stop(worker)
    result = {
        "leads": args.leads,
        "messages_per_lead": args.messages,
        "segment_ms": args.segment_ms,
        "settle_s": args.settle_s,
        "changelog_records_written": written,
        "changelog_records_left": left,
        "records_replayed": replayed,
        "restart_ready_s": round(ready_s, 1),
    }
    path = write_result("restart", result)
    print(f"{args.leads:,} leads x {args.messages} messages, segments of {args.segment_ms} ms: "
          f"{written:,} changelog records written, {left:,} left after compaction; "
          f"a restarted worker replayed {replayed:,.0f} and was ready in {ready_s:.1f} s "
          f"({path})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
