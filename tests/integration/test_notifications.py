"""Notifications: the in-app row once per event, and e-mail through a real SMTP server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from flexoraa.kafka import ensure_topics
from flexoraa.settings import Settings
from schemas.notifications import Notification
from schemas.topics import TopicNames
from tests.conftest import (
    MakeTenant,
    ManagedProcess,
    StartProcess,
    free_port,
    start_worker,
)
from tests.integration.conftest import ApiFactory, flexoraa
from tests.integration.test_pipeline import eventually, read_dead_letters

pytestmark = pytest.mark.integration


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(content)))
        return "250 Message accepted for delivery"


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


@pytest.fixture(scope="module")
def worker(
    processes: StartProcess, test_settings: Settings, smtp: tuple[Inbox, int]
) -> ManagedProcess:
    return start_worker(
        processes, test_settings, name="notifications-worker",
        SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp[1]), SMTP_STARTTLS="false",
        ENABLE_AI_QUALIFICATION="false", ENABLE_LEAKAGE_PREVENTION="false",
    )  # fmt: skip


@pytest.fixture
async def api(api_factory: ApiFactory, worker: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{worker.ports['web']}") as client:
        yield client


def admin_alert(
    tenant_id: str, title: str, body: str = "50 % of your tokens are used.", **data: Any
) -> Notification:
    """A token alert for a tenant's admins, a new event each call."""
    return Notification(
        event_id=str(uuid.uuid4()), tenant_id=tenant_id, occurred_at=datetime.now(UTC),
        audience="admins", category="token_threshold", title=title, body=body, data=data,
    )  # fmt: skip


async def publish(settings: Settings, notification: Notification, times: int = 1) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        for _ in range(times):
            await producer.send_and_wait(
                TopicNames(settings.topic_prefix).notifications,
                notification.model_dump_json().encode(),
                key=notification.tenant_id.encode(),
            )
    finally:
        await producer.stop()


async def test_admins_get_one_in_app_row_and_an_email(
    api: httpx.AsyncClient,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    test_settings: Settings,
    smtp: tuple[Inbox, int],
) -> None:
    tenant = await make_tenant()
    for email in ("owner@example.com", "ops@example.com"):
        await db.execute(
            "INSERT INTO tenant_admins (tenant_id, email) VALUES ($1, $2)", tenant.tenant_id, email
        )
    notification = admin_alert(
        tenant.tenant_id, "80 % of your tokens are used",
        "Top up to keep the AI assistant running.", percent=80,
    )  # fmt: skip
    await publish(test_settings, notification, times=3)  # redelivered: stored and mailed once

    async def listed() -> Any:
        rows = (await api.get("/api/notifications", headers=tenant.headers)).json()
        return rows or None

    (row,) = await eventually(listed, what="the in-app notification")
    assert row["title"] == "80 % of your tokens are used"
    assert row["recipient"] == "admins"
    assert row["data"] == {"percent": 80}
    inbox, _ = smtp
    mails = await eventually(
        lambda: _mails_for(inbox, "owner@example.com"), what="the notification e-mail"
    )
    (recipients, mail) = mails[0]
    assert sorted(recipients) == ["ops@example.com", "owner@example.com"]
    assert mail["Subject"] == "80 % of your tokens are used"
    assert len(mails) == 1
    read = await api.post(
        f"/api/notifications/{row['notification_id']}/read", headers=tenant.headers
    )
    assert read.json()["read_at"] is not None
    assert (await api.get("/api/notifications?unread=true", headers=tenant.headers)).json() == []
    other = await make_tenant("Other")
    assert (await api.get("/api/notifications", headers=other.headers)).json() == []


async def _mails_for(inbox: Inbox, address: str) -> Any:
    found = [(to, mail) for to, mail in inbox.messages if address in to]
    return found or None


async def test_a_notification_for_an_unknown_tenant_is_dead_lettered_and_the_rest_stored(
    api: httpx.AsyncClient,
    make_tenant: MakeTenant,
    test_settings: Settings,
    worker: ManagedProcess,
) -> None:
    # Before: the foreign key failed the whole batch on every retry and stopped the worker; a
    # tenant id that is no UUID at all failed the tenants lookup, and stopped it too.
    tenant = await make_tenant()
    unknown_tenant = str(uuid.uuid4())
    malformed_tenant = f"tenant-{uuid.uuid4().hex[:8]}"

    def alert(tenant_id: str) -> Notification:
        return admin_alert(tenant_id, f"alert for {tenant_id}")

    await publish(test_settings, alert(unknown_tenant))
    await publish(test_settings, alert(malformed_tenant))
    await publish(test_settings, alert(tenant.tenant_id))

    async def listed() -> Any:
        return (await api.get("/api/notifications", headers=tenant.headers)).json() or None

    (row,) = await eventually(listed, what="the known tenant's notification")
    assert row["title"] == f"alert for {tenant.tenant_id}"
    (letter,) = await read_dead_letters(test_settings, unknown_tenant.encode(), 1)
    assert letter.reason == f"unknown tenant {unknown_tenant}"
    (letter,) = await read_dead_letters(test_settings, malformed_tenant.encode(), 1)
    assert letter.reason == f"unknown tenant {malformed_tenant}"
    assert worker.process.poll() is None


async def test_a_notification_postgresql_refuses_is_dead_lettered_and_its_batch_stored(
    api: httpx.AsyncClient,
    make_tenant: MakeTenant,
    test_settings: Settings,
    worker: ManagedProcess,
) -> None:
    # A NUL in a text is valid JSON and a valid event, but no PostgreSQL text: the batch's
    # insert failed, at every restart (a poison record, streams.poison).
    tenant = await make_tenant()
    notifications = [
        admin_alert(tenant.tenant_id, title) for title in ("before", "nul \u0000 inside", "after")
    ]
    for notification in notifications:
        await publish(test_settings, notification)

    async def listed() -> Any:
        rows = (await api.get("/api/notifications", headers=tenant.headers)).json()
        return rows if len(rows) == 2 else None

    rows = await eventually(listed, what="the two storable notifications")
    assert sorted(row["title"] for row in rows) == ["after", "before"]
    (letter,) = await read_dead_letters(test_settings, tenant.tenant_id.encode(), 1)
    assert letter.reason.startswith("processing failed: ")
    refused = Notification.model_validate_json(base64.b64decode(letter.raw_base64))
    assert refused.event_id == notifications[1].event_id
    assert worker.process.poll() is None


async def test_a_dead_lettered_notification_is_stored_once_replayed_after_its_tenant_exists(
    api: httpx.AsyncClient,
    test_settings: Settings,
    db: asyncpg.Connection,
    worker: ManagedProcess,
) -> None:
    # A tenant restored after its alerts were produced: the alert was set aside, not lost, and
    # the operator puts it back with the command line once the tenant is there.
    tenant_id = str(uuid.uuid4())
    alert = admin_alert(tenant_id, "restored tenant's alert", "80 % of your tokens are used.")
    await publish(test_settings, alert)
    await read_dead_letters(test_settings, tenant_id.encode(), 1)

    listed = flexoraa(test_settings, "dead-letters", "list", "--key", tenant_id, "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert letter["reason"] == f"unknown tenant {tenant_id}"
    assert letter["source_topic"] == TopicNames(test_settings.topic_prefix).notifications
    assert letter["key"] == tenant_id

    await db.execute("INSERT INTO tenants (tenant_id, name) VALUES ($1, 'Restored')", tenant_id)
    replayed = flexoraa(test_settings, "dead-letters", "replay", "--key", tenant_id)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["replayed"] == {letter["source_topic"]: 1}

    async def stored() -> Any:
        return await db.fetch("SELECT title FROM notifications WHERE tenant_id = $1", tenant_id)

    rows = await eventually(stored, what="the replayed notification")
    assert [row["title"] for row in rows] == ["restored tenant's alert"]
    # Marked replayed: left alone by the next replay, shown as replayed.
    again = flexoraa(test_settings, "dead-letters", "replay", "--key", tenant_id)
    assert json.loads(again.stdout) == {
        "dry_run": False,
        "replayed": {},
        "skipped": {"replayed before": 1},
        "unmarked": 0,
    }
    [marked] = [json.loads(line) for line in flexoraa(
        test_settings, "dead-letters", "list", "--key", tenant_id, "--json"
    ).stdout.splitlines()]  # fmt: skip
    assert marked["replayed_at"] is not None
    assert worker.process.poll() is None


async def test_an_unreachable_mail_server_is_tried_once_per_batch_not_once_per_alert(
    processes: StartProcess,
    test_settings: Settings,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    api_factory: ApiFactory,
) -> None:
    # Each e-mail waited out the SMTP timeout in turn, and the next batch's in-app alerts
    # behind them: a leak storm with the mail server firewalled delayed alerts by hours.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(16)  # accepts, never answers: every attempt waits for the timeout
    tenant = await make_tenant()
    await db.execute("INSERT INTO tenant_admins (tenant_id, email) VALUES ($1, 'a@example.com')",
                     tenant.tenant_id)  # fmt: skip
    topic_prefix = f"{test_settings.topic_prefix}-smtpdown"
    settings = test_settings.model_copy(update={"topic_prefix": topic_prefix})
    await ensure_topics(settings)
    worker = start_worker(
        processes, settings, name="smtp-down-worker",
        SMTP_HOST="127.0.0.1", SMTP_PORT=str(black_hole.getsockname()[1]),
        SMTP_STARTTLS="false", SMTP_TIMEOUT_S="2",
        ENABLE_AI_QUALIFICATION="false", ENABLE_LEAKAGE_PREVENTION="false",
    )  # fmt: skip
    try:
        for i in range(6):
            await publish(settings, admin_alert(tenant.tenant_id, f"alert {i}"))
        async with api_factory(
            worker_url=f"http://127.0.0.1:{worker.ports['web']}", topic_prefix=topic_prefix
        ) as api:

            async def all_listed() -> Any:
                rows = (await api.get("/api/notifications", headers=tenant.headers)).json()
                return rows if len(rows) == 6 else None

            await eventually(all_listed, timeout_s=30, what="the six in-app rows")
        await asyncio.sleep(3)  # time for one more attempt, were it made
        attempts = 0
        black_hole.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                black_hole.accept()[0].close()
                attempts += 1
        assert 1 <= attempts <= 2, attempts  # one per batch (the six may be split in two)
    finally:
        worker.stop()
        black_hole.close()
