"""A bench run sweeps what killed runs left on the local stack, and leaves running ones be."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import OWNER_FILE, RUNS_DIR, sweep_abandoned_runs
from flexoraa.settings import Settings

pytestmark = pytest.mark.integration

# Fresh ids each time: a topic deleted by the last run may still be going away.
KILLED, RUNNING = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
TOPICS = {run: [f"bench-{run}.inbound-messages", f"bench-{run}-sessions-changelog"]
          for run in (KILLED, RUNNING)}  # fmt: skip


def test_a_killed_runs_database_topics_and_directory_go_and_a_running_ones_stay(
    test_settings: Settings,
) -> None:
    async def superuser() -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=test_settings.postgres_port, user="postgres",
            database="postgres",
        )  # fmt: skip

    async def kafka() -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(bootstrap_servers=test_settings.kafka_bootstrap_servers)
        await admin.start()
        return admin

    async def make_runs() -> None:
        admin = await superuser()
        try:
            for run in (KILLED, RUNNING):
                await admin.execute(f'CREATE DATABASE "flexoraa_bench_{run}"')
        finally:
            await admin.close()
        topics = await kafka()
        try:
            await topics.create_topics(
                [NewTopic(name, 1, 1) for names in TOPICS.values() for name in names]
            )
        finally:
            await topics.close()

    async def left() -> tuple[set[str], set[str]]:
        admin = await superuser()
        try:
            rows = await admin.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'flexoraa_bench_%'"
            )
            databases = {row["datname"] for row in rows}
        finally:
            await admin.close()
        topics = await kafka()
        try:
            return databases, set(await topics.list_topics())
        finally:
            await topics.close()

    for run, pid in ((KILLED, "999999999"), (RUNNING, "1")):  # pid 1 always runs
        (RUNS_DIR / f"bench-{run}").mkdir(parents=True, exist_ok=True)
        (RUNS_DIR / f"bench-{run}" / OWNER_FILE).write_text(pid)
    try:
        asyncio.run(make_runs())
        # Listed once the broker's metadata has them (a killed run's were made long before).
        while not all(set(names) <= asyncio.run(left())[1] for names in TOPICS.values()):
            time.sleep(0.1)
        removed = sweep_abandoned_runs(test_settings, superuser)
        databases, topics = asyncio.run(left())
        assert f"flexoraa_bench_{KILLED}" in removed
        assert set(TOPICS[KILLED]) <= set(removed)
        assert f"flexoraa_bench_{KILLED}" not in databases
        assert not set(TOPICS[KILLED]) & topics
        assert not (RUNS_DIR / f"bench-{KILLED}").exists()
        # The running one keeps everything.
        assert f"flexoraa_bench_{RUNNING}" in databases
        assert set(TOPICS[RUNNING]) <= topics
        assert (RUNS_DIR / f"bench-{RUNNING}" / OWNER_FILE).exists()
    finally:
        (RUNS_DIR / f"bench-{RUNNING}" / OWNER_FILE).write_text("999999999")
        sweep_abandoned_runs(test_settings, superuser)
        shutil.rmtree(RUNS_DIR / f"bench-{KILLED}", ignore_errors=True)
