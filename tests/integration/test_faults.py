"""Fault injection: a worker killed with -9 mid-load, the broker restarted, PostgreSQL down for
20 s (and a worker stopped during either outage), a rebalance mid-load, and every source topic
replayed into a fresh app.

Each test drives a load of inbound messages through the real API (a client that retries a 503
with the same `channel_message_id`, as connectors do) and then checks that every accepted
message had its effects exactly once:

- sessions: every lead's message count in the worker's table and in PostgreSQL equals the
  messages accepted for it;
- tokens: each AI message was billed once (one usage row per AI message, per lead), and the
  worker's balance is exactly the credits minus the distinct usage events on the topic;
- leakage: no unanswered wait produced two leaks (in PostgreSQL or, with another identity, on
  the lead-events topic).

`make test` runs them all at `FAULT_EVENTS` (default 1200); `make faults` runs only them, and
`FAULT_EVENTS=50000 make faults` at full size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from flexoraa import stack
from flexoraa.cli import STOP_GRACE_S
from flexoraa.kafka import delete_topics, ensure_topics
from flexoraa.settings import Settings
from schemas.messaging import LeadEvent
from schemas.tokens import TokenUsage
from schemas.topics import TopicNames
from streams.agents.qualification import derived_id
from tests.conftest import (
    MakeTenant,
    ManagedProcess,
    StartProcess,
    Tenant,
    free_port,
    http_get_json,
    process_starter,
    start_worker,
)
from tests.integration.conftest import ApiFactory, read_records, read_topic
from tests.integration.test_pipeline import eventually

pytestmark = [pytest.mark.integration, pytest.mark.faults]

EVENTS = int(os.environ.get("FAULT_EVENTS", "1200"))
MESSAGES_PER_LEAD = 10
# Every worker: timers checked often, leaks after a few seconds (so deadlines are pending
# across the faults), no 24-hour cold recovery within a test.
LEAK_THRESHOLD_S = 5
WORKER_ENV = {"TIMER_TICK_MS": "200", "LEAK_THRESHOLD_S": str(LEAK_THRESHOLD_S)}
# An interview (each answer fills a slot), then messages the AI no longer answers.
TEXTS = (
    "Hi, we need a CRM for our sales team of twelve",
    "Budget is around $8k",
    "We want it live next month",
    "I'm the founder, I decide",
    "Only worry is the migration effort",
    "Let's schedule a call on Monday",
    "thanks!",
    "any update?",
    "hello?",
    "still there?",
)


@dataclass
class Load:
    """What the client sent and the API accepted (202)."""

    run: str
    tenants: list[Tenant]
    accepted: Counter[str] = field(default_factory=Counter)  # lead id -> messages
    lead_tenant: dict[str, str] = field(default_factory=dict)
    retried: int = 0  # 503s, 429s and connection errors retried with the same message id

    def leads_of(self, tenant: Tenant) -> list[str]:
        return sorted(lead for lead, t in self.lead_tenant.items() if t == tenant.tenant_id)


async def post_until_accepted(
    api: httpx.AsyncClient, tenant: Tenant, body: dict[str, str]
) -> tuple[httpx.Response, int]:
    """Posts an inbound message until the API accepts it, retrying as a connector does: a 503
    (broker down), a connection error, and the API key's rate limit (429 with Retry-After, hit
    at full size). The 202 response and how many attempts were retried."""
    for retries in range(600):
        try:
            response = await api.post("/api/events/inbound", headers=tenant.headers, json=body)
        except httpx.TransportError:
            await asyncio.sleep(0.5)
            continue
        if response.status_code == 202:
            return response, retries
        assert response.status_code in (429, 503), response.text
        await asyncio.sleep(float(response.headers.get("retry-after", "0.5")))
    raise AssertionError(f"message {body['channel_message_id']} was never accepted")


async def drive(
    api: httpx.AsyncClient,
    tenants: list[Tenant],
    events: int,
    *,
    progress: dict[float, asyncio.Event] | None = None,
    concurrency: int = 16,
) -> Load:
    """Posts `events` messages, spread over leads of `tenants` (MESSAGES_PER_LEAD each), each
    retried until accepted. `progress[f]` is set once a fraction `f` was accepted."""
    load = Load(run=uuid.uuid4().hex[:8], tenants=tenants)
    leads_per_tenant = max(1, events // (MESSAGES_PER_LEAD * len(tenants)))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(events):
        queue.put_nowait(i)
    done = 0

    async def post(i: int) -> None:
        nonlocal done
        tenant = tenants[i % len(tenants)]
        lead = (i // len(tenants)) % leads_per_tenant
        turn = i // (len(tenants) * leads_per_tenant)
        body = {
            "channel": "webchat",
            "contact": f"fault-{load.run}-{lead}",
            "text": TEXTS[turn % len(TEXTS)],
            "channel_message_id": f"{load.run}-{i}",
        }
        response, retries = await post_until_accepted(api, tenant, body)
        load.retried += retries
        lead_id = response.json()["lead_id"]
        load.accepted[lead_id] += 1
        load.lead_tenant[lead_id] = tenant.tenant_id
        done += 1
        for fraction, reached in (progress or {}).items():
            if done >= fraction * events:
                reached.set()

    async def client() -> None:
        while not queue.empty():
            await post(queue.get_nowait())

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return load


def fault_worker(
    processes: StartProcess, settings: Settings, name: str, **env: str
) -> ManagedProcess:
    """A worker on a free port with the fault tests' short tick and leak threshold."""
    return start_worker(processes, settings, name=name, web_port=free_port(),
                        **{**WORKER_ENV, **env})  # fmt: skip


def worker_url(worker: ManagedProcess) -> str:
    return f"http://127.0.0.1:{worker.ports['web']}"


async def metric_total(url: str, name: str) -> float:
    """The sum of a metric's samples on a process's /metrics page."""
    async with httpx.AsyncClient() as client:
        page = (await client.get(f"{url}/metrics", timeout=10)).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name
    )


def failed_metadata_updates(log: str) -> int:
    """aiokafka's failed metadata updates in a worker's log: it logs each one, and the log
    filter (flexoraa.logs) folds repeats into "[N more like this ...]" on the next line let
    through (so the last few seconds of an outage may be missing)."""
    attempts = 0
    for line in log.splitlines():
        if "Unable to update metadata" in line:
            held_back = re.search(r"\[(\d+) more like this", line)
            attempts += 1 + (int(held_back.group(1)) if held_back else 0)
    return attempts


async def sessions_settled(load: Load, url: str, db: asyncpg.Connection) -> None:
    """Every accepted message is in PostgreSQL and counted once in the worker's table."""

    async def stored() -> bool:
        rows = await db.fetch(
            "SELECT lead_id::text AS lead, count(*) AS n FROM messages"
            " WHERE direction = 'inbound' AND lead_id = ANY($1::uuid[]) GROUP BY lead_id",
            list(load.accepted),
        )
        return {r["lead"]: r["n"] for r in rows} == dict(load.accepted)

    await eventually(stored, timeout_s=300, what="every accepted message in PostgreSQL")

    def counts() -> dict[str, Any]:
        found = {}
        for lead in load.accepted:
            status, state = http_get_json(f"{url}/internal/leads/{lead}", timeout_s=10)
            found[lead] = state["session"]["message_count"] if status == 200 else status  # type: ignore[index]
        return found

    async def counted() -> bool:
        return await asyncio.to_thread(counts) == dict(load.accepted)

    await eventually(counted, timeout_s=120, what="every lead's message count in the worker")
    assert await asyncio.to_thread(counts) == dict(load.accepted)


async def agents_caught_up(settings: Settings, topics: list[str]) -> None:
    """The workers' consumer group committed the end of `topics`, in this order: every agent
    handled every record (a worker commits only past records all its agents acknowledged).
    Sessions settle long before the interview agent at full size: it runs minutes behind on
    the same topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    ends = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                            enable_auto_commit=False)  # fmt: skip
    await admin.start()
    await ends.start()
    behind: dict[str, int] = {}
    try:
        for topic in topics:
            partitions = [TopicPartition(topic, p) for p in range(settings.kafka_partitions)]
            ends.assign(partitions)

            async def committed_to_end(partitions: list[TopicPartition] = partitions) -> bool:
                end = await ends.end_offsets(partitions)
                # Faust's consumer group is the app id: the topic prefix.
                done = await admin.list_consumer_group_offsets(
                    settings.topic_prefix, partitions=partitions
                )
                # -1: nothing committed yet.
                behind.clear()
                behind.update({str(tp): end[tp] - max(done[tp].offset if tp in done else 0, 0)
                               for tp in partitions if end[tp]})  # fmt: skip
                return not any(behind.values())

            await eventually(committed_to_end, timeout_s=900, what=f"every agent done with {topic}")
    except AssertionError:
        assert behind == {}  # records not handled yet, per partition
        raise
    finally:
        await ends.stop()
        await admin.close()


async def nothing_kept(load: Load, url: str) -> None:
    """No lead of the load has AI work kept for later (waiting for its tenant's tokens)."""
    kept: list[str] = []

    def find_kept() -> bool:
        kept[:] = [lead for lead in load.accepted
                   if http_get_json(f"{url}/internal/leads/{lead}", 10)[1]["deferred_ai"]]  # type: ignore[index]  # fmt: skip
        return not kept

    try:
        await eventually(lambda: asyncio.to_thread(find_kept), timeout_s=900,
                         what="the AI work kept for the tenants' tokens resumed")  # fmt: skip
    except AssertionError:
        assert (len(kept), kept[:3]) == (0, [])
        raise


async def billed_once(load: Load, settings: Settings, url: str, db: asyncpg.Connection) -> None:
    """Every AI action billed once: each message the interview handled has one usage row (its id
    derived from the message's), every other AI message (re-engagement, recovery) one usage row;
    and each tenant's balance is exactly its credits minus the distinct usage on the topic.

    Compared once every agent is done with the inbound messages: an interview still catching
    up (after a PostgreSQL outage it waits for the tenants' settings) matched for a moment,
    then billed a step whose question the sink had not written yet."""
    await agents_caught_up(settings, [TopicNames(settings.topic_prefix).inbound_messages])
    tenant_ids = [t.tenant_id for t in load.tenants]
    mismatches: dict[str, Any] = {}

    async def matched() -> bool:
        ledger: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for row in await db.fetch(
            "SELECT lead_id, event_id, feature FROM token_ledger"
            " WHERE kind = 'usage' AND tenant_id = ANY($1::uuid[])",
            tenant_ids,
        ):
            ledger[row["lead_id"]].append((row["event_id"], row["feature"]))
        ai_messages = {
            r["lead"]: r["n"]
            for r in await db.fetch(
                "SELECT lead_id::text AS lead, count(*) AS n FROM messages WHERE direction ="
                " 'outbound' AND sent_by = 'ai' AND tenant_id = ANY($1::uuid[]) GROUP BY 1",
                tenant_ids,
            )
        }
        mismatches.clear()
        for lead in load.accepted:
            _, state = await asyncio.to_thread(http_get_json, f"{url}/internal/leads/{lead}", 10)
            interview = (state or {}).get("qualification") or {}  # type: ignore[attr-defined]
            handled = {derived_id(e, "token-usage") for e in interview.get("recent_event_ids", [])}
            billed = {e for e, feature in ledger[lead] if feature == "qualification"}
            # A step done and billed whose table write a kill -9 lost is read again; if its
            # tenant ran out meanwhile, it is kept for the next top-up (its usage id repeats:
            # billed once; its question was sent), not lost.
            kept = {derived_id(e, "token-usage")
                    for e in (state or {}).get("deferred_ai", {}).get("qualification", [])}  # type: ignore[attr-defined]  # fmt: skip
            done_then_kept = billed & kept
            billed -= done_then_kept
            other = sum(1 for _, feature in ledger[lead] if feature != "qualification")
            sent = interview.get("questions_asked", 0) + other + len(done_then_kept)
            if billed != handled or ai_messages.get(lead, 0) != sent:
                tenant_index = tenant_ids.index(load.lead_tenant[lead])
                mismatches[f"tenant {tenant_index} lead {lead}"] = (
                    len(billed), len(handled), ai_messages.get(lead, 0), sent
                )  # fmt: skip
        return not mismatches

    try:
        await eventually(matched, timeout_s=120, what="one usage row per AI action")
    except AssertionError:
        # (billed, handled, AI messages, AI actions) per lead, and where each lead's AI
        # actions got to: charged, commanded, reported sent or failed.
        explained = await trace_ai_actions(settings, db, list(mismatches)[:5])
        assert mismatches == {}, explained
        raise
    await asyncio.sleep(2)  # nothing more in flight
    assert await matched(), mismatches

    records = await read_topic(settings, [TopicNames(settings.topic_prefix).token_usage])
    usage_on_topic: dict[str, dict[str, int]] = defaultdict(dict)
    for _, _, value in records:
        event = TokenUsage.model_validate_json(value)
        if event.tenant_id in tenant_ids:
            usage_on_topic[event.tenant_id][event.event_id] = event.tokens
    for tenant_id in tenant_ids:
        credits = await db.fetchval(
            "SELECT coalesce(sum(tokens), 0) FROM token_ledger"
            " WHERE kind = 'credit' AND tenant_id = $1",
            uuid.UUID(tenant_id),
        )
        status, account = http_get_json(f"{url}/internal/tenants/{tenant_id}/tokens", 10)
        assert status == 200, account
        expected = credits - sum(usage_on_topic[tenant_id].values())
        assert account["balance"] == expected, (tenant_id, account)  # type: ignore[index]


async def trace_ai_actions(
    settings: Settings, db: asyncpg.Connection, mismatched: list[str]
) -> dict[str, Any]:
    """Where a mismatched lead's AI actions got to: the usage billed (feature, id), the AI
    commands on the topic (purpose, id) and the sends reported for them (status, command)."""
    leads = {name.rsplit(" ", 1)[-1] for name in mismatched}
    names = TopicNames(settings.topic_prefix)
    trace: dict[str, dict[str, list[Any]]] = {
        lead: {"usage": [], "commands": [], "reports": []} for lead in leads
    }
    for row in await db.fetch(
        "SELECT lead_id AS lead, feature, event_id FROM token_ledger"
        " WHERE kind = 'usage' AND lead_id = ANY($1::text[]) ORDER BY 1",
        list(leads),
    ):
        trace[row["lead"]]["usage"].append((row["feature"], row["event_id"]))
    for topic, kind, fields in (
        (names.outbound_commands, "commands", ("purpose", "event_id")),
        (names.outbound_messages, "reports", ("status", "command_id")),
    ):
        for _, _, value in await read_topic(settings, [topic]):
            record = json.loads(value)
            if record.get("lead_id") in leads and record.get("sent_by") == "ai":
                trace[record["lead_id"]][kind].append(tuple(record.get(f) for f in fields))
    return trace


async def leaks_once(load: Load, settings: Settings, db: asyncpg.Connection) -> int:
    """No wait leaked twice: one row per (lead, waiting since), one identity on the topic."""
    leads = list(load.accepted)
    twice = await db.fetch(
        "SELECT lead_id, waiting_since, count(*) FROM lead_leakage_events"
        " WHERE lead_id = ANY($1::uuid[]) GROUP BY 1, 2 HAVING count(*) > 1",
        leads,
    )
    assert twice == []
    identities: dict[tuple[str, str], set[str]] = defaultdict(set)
    wanted = set(leads)
    for _, key, value in await read_topic(
        settings, [TopicNames(settings.topic_prefix).lead_events]
    ):
        if key.decode() not in wanted:
            continue
        event = LeadEvent.model_validate_json(value)
        if event.type == "leak_detected":
            identities[(event.lead_id, str(event.data["waiting_since_ms"]))].add(event.event_id)
    assert {wait: ids for wait, ids in identities.items() if len(ids) > 1} == {}
    stored: int = await db.fetchval(
        "SELECT count(*) FROM lead_leakage_events WHERE lead_id = ANY($1::uuid[])", leads
    )
    return stored


@pytest.fixture
async def test_settings(test_settings: Settings) -> AsyncIterator[Settings]:
    """Each fault test on topics of its own (so its own consumer group and changelogs): the
    offsets and table state an earlier test's faults left behind are not this test's."""
    own = test_settings.model_copy(
        update={"topic_prefix": f"{test_settings.topic_prefix}-{uuid.uuid4().hex[:6]}"}
    )
    await ensure_topics(own)
    yield own
    await delete_topics(own)


@pytest.fixture
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartProcess]:
    """Each test's workers stop with it: one left running would share the partitions (and
    the faults) of the next test."""
    with process_starter(tmp_path_factory.mktemp("logs")) as start:
        yield start


ApiFor = Callable[[ManagedProcess], Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def api_for(api_factory: ApiFactory) -> AsyncIterator[ApiFor]:
    """In-process APIs, each reading lead state from a given worker."""
    async with contextlib.AsyncExitStack() as apis:

        async def start(worker: ManagedProcess) -> httpx.AsyncClient:
            return await apis.enter_async_context(api_factory(worker_url=worker_url(worker)))

        yield start


async def test_kill_9_of_a_worker_mid_load_every_effect_exactly_once(
    processes: StartProcess,
    test_settings: Settings,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    api_for: ApiFor,
) -> None:
    first = fault_worker(processes, test_settings, "fault-kill-a")
    api = await api_for(first)
    tenants = [await make_tenant("Busy"), await make_tenant("Dry", tokens=1)]
    halfway = asyncio.Event()
    loading = asyncio.create_task(drive(api, tenants, EVENTS, progress={0.4: halfway}))
    await halfway.wait()
    first.stop(signal.SIGKILL)  # deadlines pending, offsets and changelogs mid-flight
    second = fault_worker(processes, test_settings, "fault-kill-b")
    load = await loading
    await sessions_settled(load, worker_url(second), db)
    await billed_once(load, test_settings, worker_url(second), db)

    dry_leads = set(load.leads_of(tenants[1]))

    async def dry_leads_leaked() -> bool:
        rows = await db.fetch(
            "SELECT DISTINCT lead_id::text AS lead FROM lead_leakage_events WHERE tenant_id = $1",
            uuid.UUID(tenants[1].tenant_id),
        )
        return {r["lead"] for r in rows} == dry_leads

    # The paused tenant's leads are never answered: each leaks.
    await eventually(dry_leads_leaked, timeout_s=60, what="every unanswered lead to leak")
    await asyncio.sleep(LEAK_THRESHOLD_S + 2)  # any second firing would have happened
    assert await leaks_once(load, test_settings, db) >= len(dry_leads)


async def test_broker_restarted_mid_load_nothing_lost(
    processes: StartProcess,
    test_settings: Settings,
    running_stack: Settings,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    api_for: ApiFor,
) -> None:
    worker = fault_worker(processes, test_settings, "fault-broker")
    api = await api_for(worker)
    tenants = [await make_tenant("Broker")]
    halfway = asyncio.Event()
    loading = asyncio.create_task(drive(api, tenants, EVENTS // 2, progress={0.4: halfway}))
    await halfway.wait()
    outage_started = time.monotonic()
    await asyncio.to_thread(stack.stop_kafka, running_stack)
    await asyncio.sleep(3)  # the API refuses (503) while the broker is down; the client retries
    await asyncio.to_thread(stack.start_kafka, running_stack)
    outage_s = time.monotonic() - outage_started
    load = await loading
    assert load.retried > 0  # the outage was seen by the client
    await sessions_settled(load, worker_url(worker), db)
    await billed_once(load, test_settings, worker_url(worker), db)
    assert worker.process.poll() is None, worker.log_tail()
    # aiokafka's producer, holding batches it could not deliver, retried its metadata the
    # moment an attempt failed: 5,000 to 7,000 times a second, a whole core. Each of the
    # worker's clients (its producer and consumer, the tenant-status reader, the SLA prober)
    # now waits its 100 ms retry backoff after a failure: at most 40 attempts a second.
    attempts = failed_metadata_updates(worker.log_path.read_text())
    assert attempts < 100 * outage_s, f"{attempts} failed metadata updates in {outage_s:.0f} s"
    assert await metric_total(worker_url(worker), "flexoraa_kafka_metadata_failures_total") > 0
    assert await metric_total(worker_url(worker), "flexoraa_kafka_clients_failing") == 0


@contextlib.asynccontextmanager
async def postgres_down(running_stack: Settings) -> AsyncIterator[None]:
    """PostgreSQL stopped for the body, started again after it."""
    stopped = await asyncio.to_thread(stack.stop_postgres, running_stack)
    # A server this checkout did not start (another checkout's stack) cannot be stopped here.
    assert not stopped.running, f"PostgreSQL still running: {stopped.detail}"
    try:
        yield
    finally:
        await asyncio.to_thread(stack.start_postgres, running_stack)


async def test_postgres_down_for_20_s_reads_503_then_the_sink_catches_up(
    processes: StartProcess,
    test_settings: Settings,
    running_stack: Settings,
    make_tenant: MakeTenant,
    api_for: ApiFor,
) -> None:
    worker = fault_worker(processes, test_settings, "fault-pg")
    api = await api_for(worker)
    tenant = await make_tenant("Outage")
    assert (await api.get("/api/leads", headers=tenant.headers)).status_code == 200
    first = await drive(api, [tenant], EVENTS // 4)

    async with postgres_down(running_stack):
        # Reads that need PostgreSQL answer 503 (not 500, not a hang); writes go to Kafka and
        # are accepted (the API key is cached).
        listing = await api.get("/api/leads", headers=tenant.headers)
        assert listing.status_code == 503, listing.text
        assert "database" in listing.json()["detail"]
        # The load goes on through the outage and after it: the outage lasts 20 s however
        # long the load takes (12,500 messages at full size outlast the API key cache).
        loading = asyncio.create_task(drive(api, [tenant], EVENTS // 4))
        await asyncio.wait([loading], timeout=20 - 2)
    during = await loading

    async def reads_recovered() -> bool:
        response = await api.get("/api/leads", headers=tenant.headers)
        return response.status_code == 200

    await eventually(reads_recovered, timeout_s=60, what="reads to recover")
    db = await asyncpg.connect(test_settings.database_url)
    try:
        both = Load(run="both", tenants=[tenant])
        for part in (first, during):
            both.accepted.update(part.accepted)
            both.lead_tenant.update(part.lead_tenant)
        await sessions_settled(both, worker_url(worker), db)  # the sink caught up
        await billed_once(both, test_settings, worker_url(worker), db)
    finally:
        await db.close()
    assert worker.process.poll() is None, worker.log_tail()


async def test_a_worker_stopped_while_postgres_is_down_exits_after_its_drain(
    processes: StartProcess,
    test_settings: Settings,
    running_stack: Settings,
    make_tenant: MakeTenant,
    api_for: ApiFor,
) -> None:
    """Its sinks hold records, retrying the database: SIGTERM still ends it after the drain
    (not a kill), and the next worker writes everything once PostgreSQL is back."""
    first = fault_worker(processes, test_settings, "fault-pg-stop-a", WORKER_SHUTDOWN_DRAIN_S="2")
    api = await api_for(first)
    tenant = await make_tenant("Outage at stop")
    assert (await api.get("/api/leads", headers=tenant.headers)).status_code == 200
    async with postgres_down(running_stack):
        load = await drive(api, [tenant], 200)

        async def retrying() -> bool:
            return "database unreachable" in first.log_path.read_text()

        await eventually(retrying, what="the worker to retry the database")
        exit_code = await asyncio.to_thread(first.stop, signal.SIGTERM, 30)
    assert exit_code == 0, first.log_tail()  # -9: it had to be killed
    await settled_by_a_new_worker(processes, test_settings, load, "fault-pg-stop-b")


async def test_a_worker_stopped_while_the_broker_is_down_exits_and_loses_nothing(
    processes: StartProcess,
    test_settings: Settings,
    running_stack: Settings,
    make_tenant: MakeTenant,
    api_for: ApiFor,
) -> None:
    """It cannot deliver what it wrote: it exits once the drain and the grace are over, as a
    kill -9 would (not after Faust's 20-minute producer timeout), and the next worker, with the
    broker back, applies every accepted message once."""
    first = fault_worker(
        processes, test_settings, "fault-kafka-stop-a", WORKER_SHUTDOWN_DRAIN_S="2"
    )
    api = await api_for(first)
    tenant = await make_tenant("Broker down at stop")
    halfway = asyncio.Event()
    # Mid-load, so the worker holds effects and changelog writes it can no longer deliver.
    loading = asyncio.create_task(drive(api, [tenant], EVENTS, progress={0.5: halfway}))
    await halfway.wait()
    await asyncio.to_thread(stack.stop_kafka, running_stack)
    try:
        exit_code = await asyncio.to_thread(first.stop, signal.SIGTERM, 2 + STOP_GRACE_S + 30)
    finally:
        await asyncio.to_thread(stack.start_kafka, running_stack)
    load = await loading  # the rest is accepted once the broker is back
    log = first.log_path.read_text()
    # -9: it had to be killed. 0: it had nothing left to deliver (not seen in this test's
    # runs; the fix is what exits 1).
    assert exit_code in (0, 1), first.log_tail()
    assert exit_code == 0 or "stopping took longer than 12 s" in log
    # aiokafka logs every failed attempt: about 130 lines a second with the backoff, unfiltered.
    assert log.count("Unable to update metadata") < 20
    await settled_by_a_new_worker(processes, test_settings, load, "fault-kafka-stop-b")


async def settled_by_a_new_worker(
    processes: StartProcess, settings: Settings, load: Load, name: str
) -> None:
    """A worker started after the fault applies every accepted message once."""
    worker = fault_worker(processes, settings, name)
    db = await asyncpg.connect(settings.database_url)
    try:
        await sessions_settled(load, worker_url(worker), db)
    finally:
        await db.close()


def digest(load: Load, tenant: Tenant, url: str) -> list[Any]:
    """The tables' content of one tenant, without ids and times (which differ between runs)."""
    contacts = {}
    for lead in load.leads_of(tenant):
        status, state = http_get_json(f"{url}/internal/leads/{lead}", timeout_s=10)
        assert status == 200, state
        session = state["session"]  # type: ignore[index]
        qualification = state["qualification"] or {}  # type: ignore[index]
        contacts[session["contact"].rsplit("-", 1)[1]] = {
            "messages": session["message_count"],
            **{k: v for k, v in qualification.items() if not k.endswith(("_ms", "_id", "_ids"))},
        }
    status, account = http_get_json(f"{url}/internal/tenants/{tenant.tenant_id}/tokens", 10)
    assert status == 200
    return [sorted(contacts.items()), account["balance"]]  # type: ignore[index]


async def test_two_workers_with_a_rebalance_end_as_one_worker_and_a_replay_matches(
    processes: StartProcess,
    test_settings: Settings,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    api_for: ApiFor,
) -> None:
    # No leaks here: their timing is wall-clock, the rest must be the same in every run.
    env = {"LEAK_THRESHOLD_S": "3600"}
    one = fault_worker(processes, test_settings, "fault-one", **env)
    api = await api_for(one)
    events = EVENTS // 2
    alone = await drive(api, [await make_tenant("Alone")], events)
    await sessions_settled(alone, worker_url(one), db)

    halfway = asyncio.Event()
    shared_tenant = await make_tenant("Shared")
    loading = asyncio.create_task(drive(api, [shared_tenant], events, progress={0.3: halfway}))
    await halfway.wait()
    two = fault_worker(processes, test_settings, "fault-two", **env)
    shared = await loading
    await sessions_settled(shared, worker_url(two), db)
    names = TopicNames(test_settings.topic_prefix)
    await agents_caught_up(test_settings, [names.inbound_messages])
    # Messages interviewed before the new tenant's credit reached the workers were kept for
    # it (a backlog delays the credit by minutes at full size), and are resumed by deadline.
    await nothing_kept(alone, worker_url(one))
    await nothing_kept(shared, worker_url(one))
    await agents_caught_up(test_settings, [names.token_usage])
    await billed_once(shared, test_settings, worker_url(two), db)
    await billed_once(alone, test_settings, worker_url(one), db)
    # Either worker answers for any lead (it forwards to the owner).
    expected = digest(alone, alone.tenants[0], worker_url(one))
    found: list[Any] = []

    async def same_as_alone() -> bool:
        found[:] = await asyncio.to_thread(digest, shared, shared_tenant, worker_url(one))
        return found == expected

    try:
        await eventually(same_as_alone, timeout_s=120, what="the shared tenant's tables")
    except AssertionError:
        kept = 0
        for lead in shared.leads_of(shared_tenant):
            _, state = http_get_json(f"{worker_url(one)}/internal/leads/{lead}", timeout_s=10)
            kept += bool((state or {}).get("deferred_ai"))  # type: ignore[attr-defined]
        unlike = [(a, b) for a, b in zip(found[0], expected[0], strict=True) if a != b]
        # (balances, leads differing, leads with AI work kept for later, the first ones)
        assert (found[1], len(unlike), kept, unlike[:2]) == (expected[1], 0, 0, [])

    def tables(load: Load, url: str) -> dict[str, Any]:
        """Everything the worker holds for the load's leads and tenant, ids and times too."""
        found: dict[str, Any] = {}
        for lead in load.accepted:
            found[lead] = http_get_json(f"{url}/internal/leads/{lead}", timeout_s=10)
        tenant_id = load.tenants[0].tenant_id
        found[tenant_id] = http_get_json(f"{url}/internal/tenants/{tenant_id}/tokens", 10)
        return found

    # Every source topic from offset 0 into a fresh app (its own topic prefix, hence its own
    # consumer group and changelogs): the same tables.
    fresh = test_settings.model_copy(update={"topic_prefix": f"replay-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(fresh)
    replayed: ManagedProcess | None = None
    try:
        assert await copy_topics(test_settings, fresh) >= 2 * events
        replayed = fault_worker(processes, fresh, "fault-replay", **env)
        for load in (alone, shared):
            original = tables(load, worker_url(one))

            last: dict[str, Any] = {}

            async def same(load: Load = load, original: dict[str, Any] = original,
                           url: str = worker_url(replayed), last: dict[str, Any] = last,
                           ) -> bool:  # fmt: skip
                last.clear()
                last.update(tables(load, url))
                return last == original

            try:
                await eventually(same, timeout_s=180, what="the replayed tables to match")
            except AssertionError:
                differing = sorted(k for k in original if original[k] != last.get(k))
                first = differing[0]  # pytest shows where the two differ
                assert (len(differing), last.get(first)) == (0, original[first])
    finally:
        if replayed is not None:
            replayed.stop()
        await delete_topics(fresh)


async def copy_topics(source: Settings, target: Settings) -> int:
    """The topics written from outside the workers (inbound messages, token credits), record
    by record into the same partitions, keys, values and timestamps."""
    names, new = TopicNames(source.topic_prefix), TopicNames(target.topic_prefix)
    copied = 0
    producer = AIOKafkaProducer(bootstrap_servers=source.kafka_bootstrap_servers, acks="all",
                                enable_idempotence=True)  # fmt: skip
    await producer.start()
    try:
        for old_topic, new_topic in (
            (names.inbound_messages, new.inbound_messages),
            (names.token_credits, new.token_credits),
        ):
            for record in await read_records(source, [old_topic]):
                await producer.send(new_topic, key=record.key, value=record.value,
                                    partition=record.partition,
                                    timestamp_ms=record.timestamp)  # fmt: skip
                copied += 1
        await producer.flush()
    finally:
        await producer.stop()
    return copied


async def test_a_worker_started_on_a_backlog_interviews_every_message(
    processes: StartProcess,
    test_settings: Settings,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    api_for: ApiFor,
) -> None:
    # A tenant with a token account (credited through a first worker), then a backlog of
    # first messages read by a new worker: its start-up rebalances must not cost any stream
    # the records it had not taken yet (the interview agent lost the first records of each
    # partition, and nothing was committed to read them again from).
    first = fault_worker(processes, test_settings, "backlog-a")
    tenant = await make_tenant("Backlog")

    async def credited() -> bool:
        status, account = await asyncio.to_thread(
            http_get_json, f"{worker_url(first)}/internal/tenants/{tenant.tenant_id}/tokens", 10
        )
        return status == 200 and account["balance"] > 0  # type: ignore[index]

    await eventually(credited, timeout_s=60, what="the tenant's trial tokens credited")
    first.stop(signal.SIGTERM)
    api = await api_for(first)
    leads: dict[str, str] = {}  # lead id -> its message's channel id
    messages = max(400, EVENTS // 2)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)

    async def post() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {"channel": "webchat", "contact": f"backlog-{i}", "text": TEXTS[0],
                    "channel_message_id": f"backlog-{i}"}  # fmt: skip
            response, _ = await post_until_accepted(api, tenant, body)
            leads[response.json()["lead_id"]] = body["channel_message_id"]

    await asyncio.gather(*(post() for _ in range(16)))
    second = fault_worker(processes, test_settings, "backlog-b")
    missing: list[str] = []

    def interviewed() -> bool:
        missing.clear()
        for lead in leads:
            status, state = http_get_json(f"{worker_url(second)}/internal/leads/{lead}", 10)
            steps = ((state or {}).get("qualification") or {}).get("recent_event_ids", [])  # type: ignore[attr-defined]
            if status != 200 or len(steps) != 1:
                missing.append(lead)
        return not missing

    try:
        await eventually(lambda: asyncio.to_thread(interviewed), timeout_s=180,
                         what="every lead's first message interviewed")  # fmt: skip
    except AssertionError:
        assert len(missing) == 0, missing[:5]
        raise
