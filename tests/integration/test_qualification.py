"""AI qualification: the real `openai` client against a local compatible server, SDR routing
against real PostgreSQL, and the interview end to end through a worker."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from connectors.ai import LEAD_FACTS_SCHEMA, LeadFactsAnswer, QualificationAI
from connectors.sdrs import SdrRouter, close_lead
from flexoraa.settings import Settings
from tests.conftest import MakeTenant, ManagedProcess, StartProcess, Tenant, free_port, start_worker
from tests.fakes.openai_api import OpenAIFake
from tests.integration.conftest import ApiFactory
from tests.integration.test_pipeline import eventually, post

pytestmark = pytest.mark.integration
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture
async def openai_fake() -> AsyncIterator[OpenAIFake]:
    fake = OpenAIFake()
    await fake.start(free_port())
    yield fake
    await fake.stop()


def ai(settings: Settings, fake: OpenAIFake, **overrides: Any) -> QualificationAI:
    return QualificationAI(
        settings.model_copy(
            update={
                "openai_api_key": SecretStr("sk-test"),
                "openai_base_url": fake.url,
                **overrides,
            }
        )
    )


async def test_the_request_carries_the_strict_schema_and_usage_is_exact(
    test_settings: Settings, openai_fake: OpenAIFake
) -> None:
    openai_fake.usage = (321, 54)
    openai_fake.script.append(
        ("ok", {"budget": {"min": 5000, "max": 10000, "currency": "USD"},
                "next_question": "When would you like to start?"})
    )  # fmt: skip
    result = await ai(test_settings, openai_fake).extract("$5k-10k", "budget", NOW)
    (request,) = openai_fake.requests
    response_format = request["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    assert response_format["json_schema"]["schema"] == LEAD_FACTS_SCHEMA
    assert result.source == "model"
    assert result.found == {"budget": {"min": 5000, "max": 10000, "currency": "USD"}}
    assert result.question == "When would you like to start?"
    assert result.call is not None
    assert (result.call.prompt_tokens, result.call.completion_tokens) == (321, 54)
    assert result.call.ok


def test_the_schema_is_strict_everywhere() -> None:
    def check(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node["additionalProperties"] is False
                assert set(node["required"]) == set(node["properties"])
            for value in node.values():
                check(value)
        elif isinstance(node, list):
            for value in node:
                check(value)

    check(LEAD_FACTS_SCHEMA)


def test_the_answer_is_checked_against_the_schema_it_was_asked_for() -> None:
    """The pydantic models that check an answer name the fields of LEAD_FACTS_SCHEMA, at every
    level, and nothing else."""

    def shape(node: dict[str, Any], defs: dict[str, Any]) -> Any:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        if "anyOf" in node:
            shapes = [shape(option, defs) for option in node["anyOf"]]
            return next((found for found in shapes if found is not None), None)
        if node.get("type") == "object":
            return {name: shape(child, defs) for name, child in node["properties"].items()}
        if node.get("type") == "array":
            return [shape(node["items"], defs), node["items"].get("enum")]
        return node.get("enum")

    answer_schema = LeadFactsAnswer.model_json_schema()
    assert shape(answer_schema, answer_schema["$defs"]) == shape(LEAD_FACTS_SCHEMA, {})


async def test_a_500_then_200_is_retried_by_the_client(
    test_settings: Settings, openai_fake: OpenAIFake
) -> None:
    openai_fake.script.extend([("status", 500), ("ok", {"need": "a CRM"})])
    result = await ai(test_settings, openai_fake, openai_max_retries=2).extract("x", "need", NOW)
    assert len(openai_fake.requests) == 2
    assert result.source == "model"
    assert result.found == {"need": "a CRM"}


@pytest.mark.parametrize(
    "content",
    [
        "[1, 2]",
        '"just a string"',
        json.dumps({"need": "a CRM", "next_question": {"text": "?"}}),
        json.dumps({"need": "a CRM", "next_question": "x" * 20_000}),
        json.dumps({"need": "a CRM", "timeline": "soon"}),
        json.dumps({"need": "a CRM", "timeline": {"days": 10**30, "text": "eventually"}}),
        json.dumps({"need": "a CRM", "objections": ["weather"]}),
    ],
    ids=[
        "list",
        "string",
        "question-not-text",
        "question-too-long",
        "timeline-not-object",
        "timeline-days-overflow",
        "objection-not-in-enum",
    ],
)
async def test_an_answer_outside_the_schema_is_a_failed_call_and_the_builtin_extractor_answers(
    test_settings: Settings, openai_fake: OpenAIFake, content: str
) -> None:
    # An OpenAI-compatible server may ignore the schema: such an answer stopped the worker.
    openai_fake.script.append(("content", content))
    result = await ai(test_settings, openai_fake, openai_max_retries=0).extract(
        "$5k budget", "budget", NOW
    )
    assert result.source == "builtin"
    assert result.call is not None
    assert not result.call.ok
    assert result.found["budget"]["max"] == 5_000
    # The model answered all the same: what it used is charged.
    assert (result.call.prompt_tokens, result.call.completion_tokens) == openai_fake.usage
    assert result.call.reached_model


async def test_timeouts_trip_the_breaker_and_the_builtin_extractor_answers(
    test_settings: Settings, openai_fake: OpenAIFake
) -> None:
    openai_fake.script.extend([("hang", 2.0), ("hang", 2.0)])
    model = ai(
        test_settings, openai_fake, openai_timeout_s=0.3, openai_max_retries=0,
        ai_breaker_failures=2, ai_breaker_cooldown_s=60,
    )  # fmt: skip
    for _ in range(2):
        failed = await model.extract("budget is $8k", "budget", NOW)
        assert failed.source == "builtin"
        assert failed.call is not None
        assert not failed.call.ok
        assert failed.found["budget"]["max"] == 8000  # the built-in extractor answered
    calls = len(openai_fake.requests)
    skipped = await model.extract("budget is $9k", "budget", NOW)
    assert len(openai_fake.requests) == calls  # open: no call at all
    assert skipped.source == "builtin"
    assert skipped.call is None


async def add_sdr(db: asyncpg.Connection, tenant_id: str, name: str, **values: Any) -> str:
    sdr_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO sdrs (sdr_id, tenant_id, name, email, active, max_open_leads)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        sdr_id, tenant_id, name, f"{name}-{sdr_id[:6]}@example.com",
        values.get("active", True), values.get("max_open_leads", 100),
    )  # fmt: skip
    return sdr_id


@pytest.fixture
async def pool(test_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(test_settings.database_url, min_size=0)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
def router(pool: asyncpg.Pool) -> SdrRouter:
    async def factory() -> asyncpg.Pool:
        return pool

    return SdrRouter(factory)


async def test_round_robin_is_fair_and_respects_limits(
    router: SdrRouter, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant()
    a = await add_sdr(db, tenant.tenant_id, "a")
    b = await add_sdr(db, tenant.tenant_id, "b")
    c = await add_sdr(db, tenant.tenant_id, "c", max_open_leads=3)
    await add_sdr(db, tenant.tenant_id, "inactive", active=False)
    counts: Counter[str] = Counter()
    for _ in range(30):
        assignment = await router.assign(tenant.tenant_id, str(uuid.uuid4()), "qualified")
        assert assignment is not None
        counts[assignment.sdr_id] += 1
    assert counts[c] == 3
    assert abs(counts[a] - counts[b]) <= 1
    assert counts[a] + counts[b] == 27
    lead = str(uuid.uuid4())
    first = await router.assign(tenant.tenant_id, lead, "qualified")
    again = await router.assign(tenant.tenant_id, lead, "qualified")
    assert first is not None
    assert again is not None
    assert again.sdr_id == first.sdr_id
    assert not again.newly_assigned
    nobody = await make_tenant("Nobody")
    assert await router.assign(nobody.tenant_id, str(uuid.uuid4()), "qualified") is None
    # At once too: an assignment that waited on the chosen SDR's row lock took that SDR as
    # well (PostgreSQL re-checks the WHERE clause after the wait, not the ORDER BY).
    busy = await make_tenant("Busy")
    sdrs = [await add_sdr(db, busy.tenant_id, name) for name in ("x", "y", "z")]
    at_once = await asyncio.gather(
        *(router.assign(busy.tenant_id, str(uuid.uuid4()), "qualified") for _ in range(12))
    )
    assert Counter(a.sdr_id for a in at_once if a is not None) == dict.fromkeys(sdrs, 4)


async def test_a_closed_lead_frees_its_sdrs_slot_and_an_inactive_sdrs_lead_moves_on(
    router: SdrRouter, make_tenant: MakeTenant, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # Nothing released a slot: once each SDR had received max_open_leads leads, every later
    # lead went unassigned for good. And a lead stayed with an SDR deactivated since.
    tenant = await make_tenant()
    only = await add_sdr(db, tenant.tenant_id, "only", max_open_leads=1)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await router.assign(tenant.tenant_id, first, "qualified")) is not None
    assert await router.assign(tenant.tenant_id, second, "qualified") is None  # full
    closed = await close_lead(pool, tenant.tenant_id, first, "won")
    assert closed is not None
    assert (closed[0], closed[1]) == (only, "won")
    assert await close_lead(pool, tenant.tenant_id, first, "lost") == closed  # closed once
    other = await make_tenant("Other")
    assert await close_lead(pool, other.tenant_id, second, "won") is None
    taken = await router.assign(tenant.tenant_id, second, "qualified")
    assert taken is not None
    assert taken.sdr_id == only
    # The first lead's interview completes after its close: it stays closed, with its SDR.
    kept = await router.assign(tenant.tenant_id, first, "qualified")
    assert kept is not None
    assert (kept.sdr_id, kept.newly_assigned) == (only, False)
    assert await db.fetchval("SELECT outcome FROM sdr_assignments WHERE lead_id = $1",
                             uuid.UUID(first)) == "won"  # fmt: skip
    assert await db.fetchval("SELECT open_leads FROM sdrs WHERE sdr_id = $1", uuid.UUID(only)) == 1
    # Deactivated: its open lead goes to an active SDR when it is next routed.
    await db.execute("UPDATE sdrs SET active = false WHERE sdr_id = $1", uuid.UUID(only))
    successor = await add_sdr(db, tenant.tenant_id, "successor")
    moved = await router.assign(tenant.tenant_id, second, "qualified")
    assert moved is not None
    assert (moved.sdr_id, moved.newly_assigned) == (successor, True)
    # A leak of a closed lead's later message does not reopen it with another SDR.
    await add_sdr(db, tenant.tenant_id, "spare")
    assert await router.reassign(tenant.tenant_id, first, "leak", "leak-after-close") is None


async def test_an_sdr_closes_a_lead_through_the_api(
    router: SdrRouter, make_tenant: MakeTenant, db: asyncpg.Connection, api: httpx.AsyncClient
) -> None:
    tenant = await make_tenant()
    sdr = await add_sdr(db, tenant.tenant_id, "closer")
    lead = str(uuid.uuid4())
    assert await router.assign(tenant.tenant_id, lead, "qualified") is not None
    path = f"/api/leads/{lead}/close"
    closed = await api.post(path, headers=tenant.headers, json={"outcome": "won"})
    assert closed.status_code == 200, closed.text
    assert (closed.json()["sdr_id"], closed.json()["outcome"]) == (sdr, "won")
    again = await api.post(path, headers=tenant.headers, json={"outcome": "lost"})
    assert again.json() == closed.json()  # a retry answers the first close
    assert await db.fetchval("SELECT open_leads FROM sdrs WHERE sdr_id = $1", uuid.UUID(sdr)) == 0
    other = await make_tenant("Other")
    for headers, target in (
        (other.headers, path),
        (tenant.headers, f"/api/leads/{uuid.uuid4()}/close"),
    ):
        answer = await api.post(target, headers=headers, json={"outcome": "won"})
        assert answer.status_code == 404
    bad = await api.post(path, headers=tenant.headers, json={"outcome": "maybe"})
    assert bad.status_code == 422


async def test_a_reassignment_read_again_repeats_its_move(
    router: SdrRouter, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    # A worker killed after the move and before the leak was marked fired fires it again:
    # the lead went on to a third SDR, and the log showed one move.
    tenant = await make_tenant()
    for name in ("a", "b", "c"):
        await add_sdr(db, tenant.tenant_id, name)
    lead = str(uuid.uuid4())
    first = await router.assign(tenant.tenant_id, lead, "qualified")
    assert first is not None
    moved = await router.reassign(tenant.tenant_id, lead, "leak", "leak-deadline-1")
    again = await router.reassign(tenant.tenant_id, lead, "leak", "leak-deadline-1")
    assert moved is not None
    assert again is not None
    assert moved.from_sdr is not None
    assert again.from_sdr is not None
    assert (again.from_sdr.sdr_id, again.to_sdr.sdr_id) == (first.sdr_id, moved.to_sdr.sdr_id)
    assert not again.to_sdr.newly_assigned
    rows = await db.fetch("SELECT sdr_id::text AS sdr, open_leads FROM sdrs WHERE tenant_id = $1",
                          tenant.tenant_id)  # fmt: skip
    open_leads = {row["sdr"]: row["open_leads"] for row in rows}
    assert open_leads[moved.to_sdr.sdr_id] == 1
    assert open_leads[first.sdr_id] == 0
    later = await router.reassign(tenant.tenant_id, lead, "leak", "leak-deadline-2")
    assert later is not None
    assert later.to_sdr.sdr_id != moved.to_sdr.sdr_id  # another leak moves it on


# --------------------------------------------------------------------------- through a worker


@pytest.fixture(scope="module")
def worker(processes: StartProcess, test_settings: Settings) -> ManagedProcess:
    return start_worker(processes, test_settings, name="qualification-worker")


@pytest.fixture
async def api(api_factory: ApiFactory, worker: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{worker.ports['web']}") as client:
        yield client


async def qualification(api: httpx.AsyncClient, tenant: Tenant, lead_id: str, turn: int) -> Any:
    async def check() -> Any:
        response = await api.get(f"/api/leads/{lead_id}", headers=tenant.headers)
        state = response.json().get("qualification") if response.status_code == 200 else None
        return (
            state if state and (state["turn"] >= turn or state["status"] != "in_progress") else None
        )

    return await eventually(check, what=f"qualification turn {turn}")


async def test_the_interview_escalates_a_high_value_lead_and_routes_it(
    api: httpx.AsyncClient, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    tenant = await make_tenant()
    sdr = (await api.post("/api/sdrs", headers=tenant.headers,
                          json={"name": "Priya", "email": "priya@example.com"})).json()  # fmt: skip
    contact = f"a{uuid.uuid4().hex[:6]}@example.com"
    first = await post(api, tenant, channel="webchat", contact=contact, text="hello")
    lead_id = first["lead_id"]
    state = await qualification(api, tenant, lead_id, 1)
    assert state["turn"] == 1  # a greeting answers nothing: the need is asked
    await post(api, tenant, channel="webchat", contact=contact,
               text="We lose WhatsApp leads at night and need a CRM")  # fmt: skip
    state = await qualification(api, tenant, lead_id, 2)
    assert state["facts"]["need"].startswith("We lose WhatsApp leads")
    await post(api, tenant, channel="webchat", contact=contact,
               text="Budget is $8k and we want it live in 2 weeks, I'm the founder")  # fmt: skip
    state = await qualification(api, tenant, lead_id, 5)
    assert state["turn"] == 5  # budget, timeline and authority in one answer: objections next
    assert state["escalated"] is True
    assert state["sdr_id"] == sdr["sdr_id"]
    assert state["score"] >= 90

    async def history() -> Any:
        response = await api.get(
            f"/api/leads/{lead_id}/qualification/history", headers=tenant.headers
        )
        steps = response.json() if response.status_code == 200 else []
        return steps if len(steps) == 3 else None

    steps = await eventually(history, what="three qualification steps in PostgreSQL")
    assert [s["turn"] for s in steps] == [1, 2, 5]
    assert {s["source"] for s in steps} == {"builtin"}

    async def events() -> Any:
        rows = await db.fetch("SELECT type FROM lead_events WHERE lead_id = $1", lead_id)
        types = {row["type"] for row in rows}
        return types if {"escalated", "sdr_assigned"} <= types else None

    await eventually(events, what="escalated and sdr_assigned lead events")

    async def questions() -> Any:
        rows = await db.fetch(
            "SELECT body FROM messages WHERE lead_id = $1 AND sent_by = 'ai'", lead_id
        )
        return rows if len(rows) == 3 else None

    # One question per answer, sent as outbound commands (recorded as failed sends: no
    # webchat sender exists).
    await eventually(questions, what="three AI questions")
    other = await make_tenant("Other")
    hidden = await api.get(f"/api/leads/{lead_id}/qualification/history", headers=other.headers)
    assert hidden.status_code == 404


async def test_sdr_roster_api(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant()
    ravi = {"name": "Ravi", "email": "Ravi@Example.com", "max_open_leads": 5}
    created = await api.post("/api/sdrs", headers=tenant.headers, json=ravi)
    assert created.status_code == 201
    body = created.json()
    assert body["email"] == "ravi@example.com"
    duplicate = await api.post("/api/sdrs", headers=tenant.headers,
                               json={"name": "Ravi", "email": "ravi@example.com"})  # fmt: skip
    assert duplicate.status_code == 409
    bad = await api.post("/api/sdrs", headers=tenant.headers, json={"name": "X", "email": "nope"})
    assert bad.status_code == 422
    change = {"name": "Ravi K", "email": "ravi@example.com", "active": False}
    updated = await api.put(f"/api/sdrs/{body['sdr_id']}", headers=tenant.headers, json=change)
    assert updated.json()["active"] is False
    listed = (await api.get("/api/sdrs", headers=tenant.headers)).json()
    assert [s["name"] for s in listed] == ["Ravi K"]
    other = await make_tenant("Other")
    stranger = {"name": "x", "email": "x@example.com"}
    response = await api.put(f"/api/sdrs/{body['sdr_id']}", headers=other.headers, json=stranger)
    assert response.status_code == 404


async def test_a_tenants_own_threshold_decides_escalation(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    own = {"time_zone": "Asia/Kolkata", "qualification_budget_threshold": 100000,
           "qualification_escalation_days": 7}  # fmt: skip
    changed = await api.put("/api/tenant/settings", headers=tenant.headers, json=own)
    assert changed.status_code == 200, changed.text
    assert (await api.get("/api/tenant/settings", headers=tenant.headers)).json() == {
        **own, "leak_threshold_s": None,
    }  # fmt: skip
    # "America" is a directory of the tz database: an OSError, once a 500.
    for zone in ("Mars/Olympus", "America", "Europe/" + "x" * 300):
        bad = await api.put("/api/tenant/settings", headers=tenant.headers,
                            json={"time_zone": zone})  # fmt: skip
        assert bad.status_code == 422, zone
    contact = f"b{uuid.uuid4().hex[:6]}@example.com"
    text = "Budget is $8k and we want it live in 2 weeks, I'm the founder"
    first = await post(api, tenant, channel="webchat", contact=contact, text=text)
    state = await qualification(api, tenant, first["lead_id"], 2)
    # $8k escalates under the platform's 5,000 threshold, not under this tenant's 100,000.
    assert state["facts"]["budget"] is not None
    assert state["escalated"] is False
