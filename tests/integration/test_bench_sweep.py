"""A bench run sweeps what killed runs of its checkout left on the local stack, and leaves
running runs, and anything not a run of its checkout, be."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import OWNER_FILE, sweep_and_claim
from flexoraa.settings import Settings

pytestmark = pytest.mark.integration


def test_a_killed_runs_database_topics_and_directory_go_and_others_stay(
    test_settings: Settings, tmp_path: Path
) -> None:
    # Fresh ids each time: a topic deleted by the last run may still be going away.
    killed, running, foreign = (uuid.uuid4().hex[:8] for _ in range(3))
    topics = {run: [f"bench-{run}.inbound-messages", f"bench-{run}-sessions-changelog"]
              for run in (killed, running, foreign)}  # fmt: skip

    async def superuser() -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=test_settings.postgres_port, user="postgres",
            database="postgres",
        )  # fmt: skip

    async def kafka() -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(bootstrap_servers=test_settings.kafka_bootstrap_servers)
        await admin.start()
        return admin

    async def make(runs: tuple[str, ...]) -> None:
        admin = await superuser()
        try:
            for run in runs:
                await admin.execute(f'CREATE DATABASE "flexoraa_bench_{run}"')
        finally:
            await admin.close()
        client = await kafka()
        try:
            await client.create_topics([NewTopic(t, 1, 1) for run in runs for t in topics[run]])
        finally:
            await client.close()

    async def left() -> tuple[set[str], set[str]]:
        admin = await superuser()
        try:
            rows = await admin.fetch("SELECT datname FROM pg_database")
        finally:
            await admin.close()
        client = await kafka()
        try:
            return {row["datname"] for row in rows}, set(await client.list_topics())
        finally:
            await client.close()

    # A killed run, a running one (its owner a live process) and one of another checkout
    # sharing the stack (no directory here).
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    for run, pid in ((killed, "999999999"), (running, str(owner.pid))):
        (tmp_path / f"bench-{run}").mkdir()
        (tmp_path / f"bench-{run}" / OWNER_FILE).write_text(pid)
    claimed = tmp_path / "bench-0000000a"
    try:
        asyncio.run(make((killed, running, foreign)))
        # Listed once the broker's metadata has them (a killed run's were made long before).
        deadline = time.monotonic() + 30
        while not set().union(*topics.values()) <= asyncio.run(left())[1]:
            assert time.monotonic() < deadline, "the topics were never listed"
            time.sleep(0.1)
        removed = sweep_and_claim(test_settings, superuser, claimed, runs_dir=tmp_path)
        databases, listed = asyncio.run(left())
        assert {f"flexoraa_bench_{killed}", *topics[killed]} <= set(removed)
        assert f"flexoraa_bench_{killed}" not in databases
        assert not set(topics[killed]) & listed
        assert not (tmp_path / f"bench-{killed}").exists()
        for kept in (running, foreign):
            assert f"flexoraa_bench_{kept}" in databases
            assert set(topics[kept]) <= listed
        assert (tmp_path / f"bench-{running}" / OWNER_FILE).exists()
        assert (claimed / OWNER_FILE).exists()  # the run sweeping, claimed
    finally:
        owner.kill()
        owner.wait()
        (claimed / OWNER_FILE).write_text("999999999")
        sweep_and_claim(test_settings, superuser, runs_dir=tmp_path)  # the running and this
        (tmp_path / f"bench-{foreign}").mkdir()
        sweep_and_claim(test_settings, superuser, runs_dir=tmp_path)  # the foreign one
