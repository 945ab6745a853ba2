"""Qualification extraction: an OpenAI-compatible model with structured outputs, or the
built-in extractor when there is no key or the circuit breaker is open."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict, Field

from flexoraa.settings import Settings
from schemas.events import MAX_TEXT_CHARS
from streams.rules.extraction import extract
from streams.rules.qualification import QUESTIONS, SLOTS

logger = logging.getLogger(__name__)

_NULLABLE_STRING = {"type": ["string", "null"]}
ObjectionKind = Literal[
    "price", "competitor", "timing", "security", "integration", "contract", "trust", "none",
]  # fmt: skip
OBJECTION_KINDS = list(get_args(ObjectionKind))
NextStepAction = Literal["call", "demo", "meeting", "proposal"]

# Strict structured outputs: every property required, no additional properties, null for
# "not in this message".
LEAD_FACTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["need", "budget", "timeline", "authority", "objections", "next_step",
                 "next_question"],
    "properties": {
        "need": _NULLABLE_STRING,
        "budget": {"anyOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": False,
            "required": ["min", "max", "currency"],
            "properties": {"min": {"type": ["number", "null"]}, "max": {"type": ["number", "null"]},
                           "currency": _NULLABLE_STRING},
        }]},
        "timeline": {"anyOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": False, "required": ["days", "text"],
            "properties": {"days": {"type": ["integer", "null"]}, "text": {"type": "string"}},
        }]},
        "authority": {"anyOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": False,
            "required": ["decision_maker", "approver"],
            "properties": {"decision_maker": {"type": "boolean"}, "approver": _NULLABLE_STRING},
        }]},
        "objections": {"type": "array", "items": {"type": "string", "enum": OBJECTION_KINDS}},
        "next_step": {"anyOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": False, "required": ["action", "when"],
            "properties": {"action": {"type": "string", "enum": list(get_args(NextStepAction))},
                           "when": _NULLABLE_STRING},
        }]},
        "next_question": _NULLABLE_STRING,
    },
}  # fmt: skip


# The answer, checked against the schema it was asked for: an OpenAI-compatible server may ignore
# the schema, and a shape the rules do not expect (a timeline that is a string, days past what a
# table can hold) failed the interview of that message. Strict: no coercion, as the schema says.
# tests/integration/test_qualification.py keeps these models and LEAD_FACTS_SCHEMA alike.
class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Budget(_Answer):
    min: int | float | None
    max: int | float | None
    currency: str | None


class _Timeline(_Answer):
    # A century: the built-in extractor's longest is 9999 years, but no sales timeline is.
    days: int | None = Field(ge=0, le=36_500)
    text: str


class _Authority(_Answer):
    decision_maker: bool
    approver: str | None


class _NextStep(_Answer):
    action: NextStepAction
    when: str | None


class LeadFactsAnswer(_Answer):
    need: str | None
    budget: _Budget | None
    timeline: _Timeline | None
    authority: _Authority | None
    objections: list[ObjectionKind]
    next_step: _NextStep | None
    # Sent as an outbound command's text.
    next_question: str | None = Field(max_length=MAX_TEXT_CHARS)


_SYSTEM = (
    "You qualify sales leads for a business. From the customer's latest message extract only "
    "what it states: need (their problem), budget (amounts and currency code), timeline (days "
    "from today until they want to start), authority (are they the decision maker, who "
    "approves), objections, next step. Use null for anything not stated. Then write "
    "next_question: one short, friendly question asking for the slot the user names as the "
    "slot to ask next, or null if that is none."
)


class CircuitBreaker:
    """Opens after `failures` consecutive failures; while open, calls are skipped until the
    cool-down has passed, then one trial call decides (half-open): its success closes the
    breaker, its failure opens it again. The other calls meanwhile are skipped too (every
    message of a busy tenant went to a model that had just failed, each waiting its timeout)."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self._threshold = failures
        self._cooldown_s = cooldown_s
        self._consecutive = 0
        self._open_until = 0.0
        self._tripped = False
        # When the half-open trial call started; one that never reported (cancelled) is
        # given up after a cool-down, and another call tries.
        self._trial_since: float | None = None

    def allows(self, now_s: float) -> bool:
        if now_s < self._open_until:
            return False
        if not self._tripped:
            return True
        if self._trial_since is not None and now_s < self._trial_since + self._cooldown_s:
            return False
        self._trial_since = now_s
        return True

    def record_success(self) -> None:
        self._consecutive = 0
        self._open_until = 0.0
        self._tripped = False
        self._trial_since = None

    def record_failure(self, now_s: float) -> None:
        self._consecutive += 1
        if self._tripped or self._consecutive >= self._threshold:
            self._open_until = now_s + self._cooldown_s
            self._consecutive = 0
            self._tripped = True
            self._trial_since = None

    @property
    def is_open(self) -> bool:
        return time.monotonic() < self._open_until


@dataclass(frozen=True)
class ModelCall:
    """What a model call cost and how it went, for the token and latency events."""

    duration_ms: float
    ok: bool
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    @property
    def reached_model(self) -> bool:
        """Whether the model answered (if only outside the schema): its usage is charged."""
        return self.ok or self.prompt_tokens > 0 or self.completion_tokens > 0


@dataclass(frozen=True)
class Extraction:
    found: dict[str, Any]
    question: str | None
    source: str  # model | builtin
    call: ModelCall | None


class QualificationAI:
    def __init__(self, settings: Settings) -> None:
        self._model = settings.openai_model
        self._client: AsyncOpenAI | None = None
        key = settings.openai_api_key
        if key is not None:
            self._client = AsyncOpenAI(
                api_key=key.get_secret_value(),
                base_url=settings.openai_base_url,
                timeout=settings.openai_timeout_s,
                max_retries=settings.openai_max_retries,
            )
        # All of a message's attempts together: the timeout is per attempt, and with its
        # retries one message waited about 31 s, the lead's interview lane with it.
        self._deadline_s = settings.openai_timeout_s
        self.breaker = CircuitBreaker(settings.ai_breaker_failures, settings.ai_breaker_cooldown_s)

    @property
    def model(self) -> str:
        return self._model

    @property
    def uses_model(self) -> bool:
        return self._client is not None

    async def extract(
        self, text: str, expecting: str | None, now: datetime, next_slot: str | None = None
    ) -> Extraction:
        """The facts `text` states (it answers the slot `expecting`), and the model's question
        for `next_slot`."""
        builtin = extract(text, now, expecting=expecting).slots()
        if self._client is None or not self.breaker.allows(time.monotonic()):
            return Extraction(builtin, None, "builtin", None)
        started = time.perf_counter()
        response = None
        try:
            async with asyncio.timeout(self._deadline_s):
                response = await self._create(text, expecting, now, next_slot)
            content = response.choices[0].message.content or "{}"
            # Outside the schema (a list, a timeline as a string): a failed call like any
            # other (a ValidationError is a ValueError), the built-in extractor answering.
            answer = LeadFactsAnswer.model_validate_json(content).model_dump()
        # TypeError, AttributeError: a 200 whose body is not a completion (a proxy's error
        # object, `choices: null`); TimeoutError: the attempts' time is up.
        except (openai.OpenAIError, ValueError, IndexError, TypeError, AttributeError,
                TimeoutError) as exc:  # fmt: skip
            duration_ms = (time.perf_counter() - started) * 1000
            self.breaker.record_failure(time.monotonic())
            logger.warning("model extraction failed (%r); using the built-in extractor", exc)
            # An answer outside the schema still used the model: its tokens are charged.
            prompt, completion = _tokens_used(response)
            call = ModelCall(duration_ms, False, prompt, completion, error=type(exc).__name__)
            return Extraction(builtin, None, "builtin", call)
        duration_ms = (time.perf_counter() - started) * 1000
        self.breaker.record_success()
        call = ModelCall(duration_ms, True, *_tokens_used(response))
        found = {slot: answer[slot] for slot in SLOTS if answer[slot] not in (None, [], "")}
        return Extraction(found, answer["next_question"] or None, "model", call)

    async def _create(
        self, text: str, expecting: str | None, now: datetime, next_slot: str | None
    ) -> ChatCompletion:
        assert self._client is not None
        return await self._client.chat.completions.create(
            model=self._model,
            messages=[
                {"role": "system", "content": _SYSTEM},
                {
                    "role": "user",
                    "content": f"Today is {now.date().isoformat()}. The customer was "
                    f"asked about: {expecting or 'need'}. Slot to ask next: "
                    f"{next_slot or 'none'}.\nCustomer message:\n{text}",
                },
            ],
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "lead_facts",
                    "schema": LEAD_FACTS_SCHEMA,
                    "strict": True,
                },
            },
        )


def question_for(slot: str, generated: str | None) -> str:
    """The model's question when it wrote one, else the template for the slot."""
    return generated or QUESTIONS[slot]


def _tokens_used(response: Any) -> tuple[int, int]:
    """(prompt, completion) tokens a response reports; 0 for what it does not (a usage
    without them made the charge fail)."""
    usage = getattr(response, "usage", None)
    prompt = getattr(usage, "prompt_tokens", None)
    completion = getattr(usage, "completion_tokens", None)
    return (prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0)  # fmt: skip
