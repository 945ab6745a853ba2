"""The local stack, the migrations and the topics, on the real servers."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from flexoraa import stack
from flexoraa.kafka import TopicMismatch, ensure_topics
from flexoraa.settings import Settings
from schemas.migrate import MigrationError, load_migrations, migrate
from schemas.topics import TopicNames

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
    assert await ensure_topics(test_settings) == []  # the session created them already
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


async def test_a_topic_with_another_partition_count_is_an_error(test_settings: Settings) -> None:
    other = test_settings.model_copy(update={"kafka_partitions": 3})
    with pytest.raises(TopicMismatch, match="partitions"):
        await ensure_topics(other)
