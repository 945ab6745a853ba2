"""The meter's usage events: priced by the table, and capped at what an event can carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from faust.types import TopicT

from schemas.tokens import MAX_TOKENS_PER_EVENT, TokenUsage
from streams.agents.tokens import Meter
from streams.rules.tokens import parse_prices

TENANT = "5d1b8a52-3c4e-4f0a-9b7d-2e6f8c1a0b93"


@dataclass
class UsageTopic:
    sent: list[tuple[bytes, TokenUsage]] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append((key, TokenUsage.model_validate_json(value)))


async def charge(prompt: int, completion: int, per_token: int = 1000) -> tuple[int, TokenUsage]:
    topic = UsageTopic()
    meter = Meter(cast(TopicT, topic), parse_prices("qualification=2"), per_token)
    charged = await meter.charge(
        event_id="e-1", tenant_id=TENANT, lead_id=None, feature="qualification",
        model="gpt", prompt_tokens=prompt, completion_tokens=completion,
    )  # fmt: skip
    [(key, usage)] = topic.sent
    assert key == TENANT.encode()
    return charged, usage


async def test_an_action_is_charged_its_price_and_its_model_tokens() -> None:
    charged, usage = await charge(1500, 600)
    assert (usage.prompt_tokens, usage.completion_tokens) == (1500, 600)
    assert usage.tokens == charged == 2 + 3  # the price, and 2,100 model tokens per 1,000


async def test_absurd_usage_from_a_model_server_is_capped_not_a_failed_action() -> None:
    charged, usage = await charge(10**15, 10**15, per_token=1)
    assert usage.prompt_tokens == usage.completion_tokens == MAX_TOKENS_PER_EVENT
    assert charged == usage.tokens == MAX_TOKENS_PER_EVENT
