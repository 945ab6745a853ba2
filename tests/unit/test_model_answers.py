"""A model call that answers a 200 that is not a completion, or takes too long over its retries,
is a failed call (the built-in extractor answers), not a message dead-lettered or a lane held
for half a minute. Through the OpenAI client, against a local server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr

from connectors.ai import QualificationAI
from flexoraa.settings import Settings
from tests.conftest import free_port
from tests.fakes.openai_api import OpenAIFake


@pytest.fixture
async def model() -> AsyncIterator[OpenAIFake]:
    fake = OpenAIFake()
    await fake.start(free_port())
    yield fake
    await fake.stop()


def ai(model: OpenAIFake, **settings: Any) -> QualificationAI:
    return QualificationAI(Settings(openai_api_key=SecretStr("sk-test"), openai_base_url=model.url,
                                    ai_breaker_failures=100, **settings))  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "upstream failed", "type": "proxy_error"}},
        {"id": "x", "object": "chat.completion", "choices": None},
        {"id": "x", "object": "chat.completion",
         "choices": [{"index": 0, "message": None, "finish_reason": "stop"}],
         "usage": {"total_tokens": 3}},
    ],
    ids=["error-object", "choices-null", "message-null"],
)  # fmt: skip
async def test_a_200_that_is_not_a_completion_is_a_failed_call(
    model: OpenAIFake, body: dict[str, Any]
) -> None:
    model.script.append(("body", body))
    extraction = await ai(model).extract("We need a CRM", "need", datetime.now(UTC), "budget")
    assert extraction.source == "builtin"
    assert extraction.found["need"]  # the built-in extractor's
    assert extraction.call is not None
    assert not extraction.call.ok
    assert (extraction.call.prompt_tokens, extraction.call.completion_tokens) == (0, 0)


async def test_a_slow_model_gets_one_timeout_for_all_its_attempts(model: OpenAIFake) -> None:
    # Each attempt had the timeout, and two retries followed: a message waited about 31 s.
    model.script.extend([("hang", 2.0)] * 3)
    slow = ai(model, openai_timeout_s=0.3, openai_max_retries=2)
    extraction = await slow.extract("We need a CRM", "need", datetime.now(UTC), "budget")
    assert extraction.call is not None
    assert extraction.call.error == "TimeoutError"
    assert len(model.requests) == 1
