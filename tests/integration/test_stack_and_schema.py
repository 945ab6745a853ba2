"""The local stack, the migrations and the topics, on the real servers."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from flexoraa import stack
from flexoraa.kafka import (
    TopicMismatch,
    TopicsEnsured,
    TopicsNotCreated,
    delete_topics,
    ensure_topics,
    missing_topics,
)
from flexoraa.settings import Settings
from schemas.migrate import MigrationError, load_migrations, migrate
from schemas.topics import TopicNames
from tests.conftest import free_port, process_starter, settings_env, start_worker
from tests.integration.test_pipeline import eventually

SEED_TABLES = {
    "lead_qualification_state",
    "lead_leakage_events",
    "lead_reassignment_log",
    "lead_recovery_log",
    "payment_orders",
    "gmail_poll_state",
    "integration_credentials",
    "sla_metrics",
    "sla_violations",
    "sla_daily_reports",
    "notifications",
    "subscriptions",
}


def test_stack_up_is_idempotent(running_stack: Settings) -> None:
    before = stack.stack_status(running_stack)
    assert all(status.running for status in before), before
    again = stack.stack_up(running_stack)
    assert [s.running for s in again] == [True, True]
    # A second `up` finds the servers running instead of starting new ones.
    assert [s.pid for s in again] == [s.pid for s in before]


def test_an_interrupted_copy_of_the_kafka_jars_is_replaced(
    running_stack: Settings, tmp_path: Path
) -> None:
    """A copy cut short left a truncated jar that the next resolution kept (Maven overwrites a
    release jar only when its source is newer): the broker failed at every start. Resolved
    from ~/.m2, which the running stack filled."""
    settings = running_stack.model_copy(update={"cache_dir": tmp_path})
    good = stack.kafka_libs_dir(running_stack)
    libs = stack.kafka_libs_dir(settings)
    libs.mkdir(parents=True)
    jar = f"kafka_2.13-{settings.kafka_version}.jar"
    (libs / jar).write_bytes((good / jar).read_bytes()[:100_000])
    assert stack.ensure_kafka_libs(settings) == libs
    assert (libs / jar).read_bytes() == (good / jar).read_bytes()
    assert sorted(p.name for p in libs.iterdir()) == sorted(p.name for p in good.iterdir())
    assert [p.name for p in libs.parent.iterdir()] == ["libs"]  # nothing of the work left


def test_a_cluster_whose_initdb_was_cut_short_is_made_again(running_stack: Settings) -> None:
    """initdb writes PG_VERSION first: one cut short left a cluster every later start took for
    made, and PostgreSQL failed to start until someone deleted it."""
    settings = running_stack.model_copy(
        update={
            "stack_dir": running_stack.stack_dir / f"pg-{uuid.uuid4().hex[:8]}",
            "postgres_port": free_port(),
        }
    )
    root = stack.postgres_dir(settings)
    try:
        (root / "data.initdb").mkdir(parents=True)  # what a killed initdb leaves now
        (root / "data.initdb" / "PG_VERSION").write_text("17\n")
        (root / "data").mkdir()  # and one killed before it wrote PG_VERSION
        (root / "data" / "global").mkdir()
        assert stack.start_postgres(settings).running
        assert not (root / "data.initdb").exists()
    finally:
        stack.stop_postgres(settings)
        shutil.rmtree(settings.stack_dir, ignore_errors=True)


async def test_migrations_apply_once_and_in_order(running_stack: Settings) -> None:
    database = f"flexoraa_migrate_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(
        host="127.0.0.1", port=running_stack.postgres_port, user="postgres", database="postgres"
    )
    await admin.execute(f'CREATE DATABASE "{database}" OWNER flexoraa')
    dsn = f"postgresql://flexoraa@127.0.0.1:{running_stack.postgres_port}/{database}"
    try:
        versions = [m.version for m in load_migrations()]
        assert versions == sorted(versions)
        assert await migrate(dsn) == versions
        assert await migrate(dsn) == []
        conn = await asyncpg.connect(dsn)
        try:
            tables = {
                row["tablename"]
                for row in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
        finally:
            await conn.close()
        assert {"tenants", "api_keys", "leads", "messages"} | SEED_TABLES <= tables
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


async def test_an_edited_migration_is_refused(test_settings: Settings, tmp_path: Path) -> None:
    edited = tmp_path / "migrations"
    edited.mkdir()
    for migration in load_migrations():
        (edited / f"{migration.version}.sql").write_text(migration.sql)
    first = load_migrations()[0]
    (edited / f"{first.version}.sql").write_text(first.sql + "\n-- edited\n")
    with pytest.raises(MigrationError, match=first.version):
        await migrate(test_settings.database_url, edited)


async def test_topics_are_created_co_partitioned(test_settings: Settings) -> None:
    # The session created them already, with the settings' segment sizes.
    assert await ensure_topics(test_settings) == TopicsEnsured(created=[], reconfigured=[])
    admin = AIOKafkaAdminClient(bootstrap_servers=test_settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        names = TopicNames(test_settings.topic_prefix).all()
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    assert {d["topic"]: len(d["partitions"]) for d in described} == {
        name: test_settings.kafka_partitions for name in names
    }


async def topic_overrides(settings: Settings, name: str) -> dict[str, str]:
    """The settings of the topic itself (not the broker's defaults)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    finally:
        await admin.close()
    return {entry[0]: entry[1] for entry in response.resources[0][4] if entry[3] == 1}


async def set_overrides(settings: Settings, name: str, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs)])
    finally:
        await admin.close()
    await until_overrides(settings, name, configs)


async def until_overrides(settings: Settings, name: str, configs: dict[str, str]) -> None:
    """A topic's new settings reach the broker's metadata shortly after the answer."""
    for _ in range(100):
        if await topic_overrides(settings, name) == configs:
            return
        await asyncio.sleep(0.1)
    assert await topic_overrides(settings, name) == configs


async def test_compacted_topics_roll_segments_so_compaction_reaches_them(
    test_settings: Settings,
) -> None:
    settings = test_settings.model_copy(
        update={
            "topic_prefix": f"segments-{uuid.uuid4().hex[:8]}",
            "changelog_segment_ms": 120_000,
            "changelog_segment_bytes": 8 * 1024 * 1024,
        }
    )
    topics = TopicNames(settings.topic_prefix)
    sessions = topics.changelog("sessions")
    try:
        created = await ensure_topics(settings)
        assert set(created.created) == set(topics.all())
        segments = {
            "cleanup.policy": "compact",
            "segment.ms": "120000",
            "segment.bytes": str(8 * 1024 * 1024),
        }
        await until_overrides(settings, sessions, segments)
        assert await topic_overrides(settings, topics.inbound_messages) == {}

        # Created by an older version (Kafka's 7-day segments), with an operator's own setting.
        operators = {"min.cleanable.dirty.ratio": "0.3"}
        await set_overrides(settings, sessions, {"cleanup.policy": "compact", **operators})
        assert await ensure_topics(settings) == TopicsEnsured([], reconfigured=[sessions])
        await until_overrides(settings, sessions, {**segments, **operators})
        assert await ensure_topics(settings) == TopicsEnsured([], [])
    finally:
        await delete_topics(settings)


async def test_a_topic_with_another_partition_count_is_an_error(test_settings: Settings) -> None:
    other = test_settings.model_copy(update={"kafka_partitions": 3})
    with pytest.raises(TopicMismatch, match="partitions"):
        await ensure_topics(other)


async def test_topics_the_broker_refuses_to_create_are_an_error(test_settings: Settings) -> None:
    # A replication factor the single broker cannot meet: each topic is refused in the answer,
    # which the admin client does not raise for; they were reported created.
    other = test_settings.model_copy(
        update={"topic_prefix": f"refused-{uuid.uuid4().hex[:8]}", "kafka_replication_factor": 2}
    )
    with pytest.raises(TopicsNotCreated, match="InvalidReplicationFactorError"):
        await ensure_topics(other)
    assert await missing_topics(other) == TopicNames(other.topic_prefix).all()
    # `flexoraa topics create` says why, without a traceback.
    env = settings_env(other, KAFKA_REPLICATION_FACTOR="2")
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flexoraa", "topics", "create"], env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.startswith("error: the broker refused to create ")
    assert "Traceback" not in run.stderr


async def test_a_worker_started_before_its_topics_waits_for_them_and_says_so(
    test_settings: Settings, tmp_path: Path
) -> None:
    """Subscribed to topics the broker did not list yet, a worker ignored them until its next
    metadata refresh, minutes later, and was not ready all that while."""
    settings = test_settings.model_copy(update={"topic_prefix": f"early-{uuid.uuid4().hex[:8]}"})
    log = tmp_path / "early.log"
    try:
        with process_starter(tmp_path) as processes:
            starting = asyncio.create_task(
                asyncio.to_thread(start_worker, processes, settings, "early")
            )

            async def says_what_is_missing() -> bool:
                return log.exists() and "topics missing" in log.read_text(errors="replace")

            await eventually(says_what_is_missing, timeout_s=60, what="the worker to say so")
            assert "run `flexoraa topics create`" in log.read_text()
            assert not starting.done()  # not ready
            await ensure_topics(settings)
            worker = await starting  # ready once they exist (or start_worker's deadline)
            assert worker.process.poll() is None

            # Stopped while it waits: at once, and cleanly.
            never = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}-none"})
            stopped = processes("stopped", ["worker"], settings_env(never))
            stopped_log = tmp_path / "stopped.log"

            async def waiting() -> bool:
                return stopped_log.exists() and "topics missing" in stopped_log.read_text()

            await eventually(waiting, timeout_s=60, what="the second worker to wait")
            assert await asyncio.to_thread(stopped.stop, signal.SIGTERM, 5) == 0
    finally:
        await delete_topics(settings)
