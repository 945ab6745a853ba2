"""Every model call of the interview is charged: a token-usage event with the model's prompt and
completion tokens and the platform tokens from the price table."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from flexoraa.settings import Settings
from schemas.tokens import TokenUsage
from schemas.topics import TopicNames
from tests.conftest import MakeTenant, ManagedProcess, StartProcess, free_port, start_worker
from tests.fakes.openai_api import OpenAIFake
from tests.integration.conftest import ApiFactory, read_topic
from tests.integration.test_pipeline import eventually, post

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def openai_fake() -> AsyncIterator[OpenAIFake]:
    fake = OpenAIFake()
    fake.usage = (321, 54)
    await fake.start(free_port())
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
def worker(
    processes: StartProcess, test_settings: Settings, openai_fake: OpenAIFake
) -> ManagedProcess:
    return start_worker(
        processes, test_settings, name="ai-usage-worker", OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=openai_fake.url, OPENAI_MODEL="gpt-4o-mini",
        TOKEN_PRICES="qualification=2,reengagement=1,recovery=1",
        TOKEN_MODEL_TOKENS_PER_TOKEN="100",
    )  # fmt: skip


@pytest.fixture
async def api(api_factory: ApiFactory, worker: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{worker.ports['web']}") as client:
        yield client


async def test_a_model_call_is_charged_from_its_usage_and_the_price_table(
    api: httpx.AsyncClient,
    openai_fake: OpenAIFake,
    test_settings: Settings,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant(tokens=50)
    answer = {"need": "a CRM for our WhatsApp leads", "next_question": "Your budget?"}
    openai_fake.script.append(("ok", answer))
    lead_id = (await post(api, tenant, channel="webchat", contact="ai-usage@example.com",
                          text="We need a CRM for our WhatsApp leads"))["lead_id"]  # fmt: skip
    topic = TopicNames(test_settings.topic_prefix).token_usage

    async def charged() -> Any:
        records = await read_topic(test_settings, [topic], tenant.tenant_id)
        return [TokenUsage.model_validate_json(v) for _, _, v in records]

    (usage,) = await eventually(charged, what="the token-usage event")
    assert usage.feature == "qualification"
    assert usage.lead_id == lead_id
    assert usage.model == "gpt-4o-mini"
    assert (usage.prompt_tokens, usage.completion_tokens) == (321, 54)
    assert usage.tokens == 2 + 4  # the action's price + one per started 100 model tokens

    async def balance() -> Any:
        response = await api.get("/api/tokens/balance", headers=tenant.headers)
        return response.json() if response.json().get("balance") == 44 else None

    assert (await eventually(balance, what="the balance after the charge"))["paused"] is False

    async def ledger() -> Any:
        return await db.fetchrow(
            "SELECT model, prompt_tokens, completion_tokens, tokens FROM token_ledger"
            " WHERE event_id = $1", usage.event_id,
        )  # fmt: skip

    row = await eventually(ledger, what="the ledger row")
    assert dict(row) == {"model": "gpt-4o-mini", "prompt_tokens": 321, "completion_tokens": 54,
                         "tokens": 6}  # fmt: skip
