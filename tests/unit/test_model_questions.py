"""The model writes its question before the state machine picks the next slot: it is told the
slot the machine picks if the message answers the one asked, and its question goes out only when
the machine does pick that slot. Told the slot just asked, it asked each lead again what they
had just answered, and the next-step question was never asked."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from connectors.ai import Extraction
from schemas.events import InboundMessage
from streams.agents.qualification import Interviewer, QualificationTopics
from streams.rules.qualification import QUESTIONS, Policy, is_answer, likely_next_slot, new_state
from tests.unit.test_assignment_effects import Gate, Meter, Router, Tenants, Topic

TENANT, LEAD = str(uuid.uuid4()), str(uuid.uuid4())


@dataclass
class ScriptedModel:
    """States the facts scripted per message and writes a question for the slot it is told."""

    answers: list[dict[str, Any]]
    told: list[str | None] = field(default_factory=list)
    model = "gpt-test"

    async def extract(
        self, text: str, expecting: str | None, now: datetime, next_slot: str | None = None
    ) -> Extraction:
        self.told.append(next_slot)
        return Extraction(self.answers.pop(0), f"Model asks about {next_slot}?", "model", None)


@dataclass
class Interview:
    questions: list[str]
    told: list[str | None]
    lead_events: list[dict[str, Any]]
    state: dict[str, Any] | None


async def run_interview(
    answers: list[dict[str, Any]],
    *,
    channel: str = "whatsapp",
    mailbox_connected: bool = True,
    email_configured: bool = True,
    state: dict[str, Any] | None = None,
) -> Interview:
    commands, events, model = Topic(), Topic(), ScriptedModel(answers)
    topics = QualificationTopics(
        lead_events=cast(Any, events), outbound_commands=cast(Any, commands),
        notifications=cast(Any, Topic()), latency=cast(Any, Topic()),
    )  # fmt: skip
    interviewer = Interviewer(
        cast(Any, model), cast(Any, Router(True)),
        Policy(budget_threshold=10_000, budget_currency="USD", escalation_days=30),
        cast(Any, Tenants(mailbox_connected)), topics, cast(Any, Gate()), cast(Any, Meter()),
        email_configured=email_configured,
    )  # fmt: skip
    contact = "lead@example.com" if channel == "email" else "+919800000004"
    for i in range(len(answers)):
        message = InboundMessage(event_id=str(uuid.uuid4()), tenant_id=TENANT,
                                 occurred_at=datetime.now(UTC), lead_id=LEAD,
                                 channel=cast(Any, channel), contact=contact, text=f"m{i}",
                                 received_at=datetime.now(UTC))  # fmt: skip
        state = await interviewer.handle(message, state) or state
    return Interview(
        [c["text"] for c in commands.sent],
        model.told,
        [e["data"] for e in events.sent if e["type"] == "qualification_updated"],
        state,
    )


async def interview(answers: list[dict[str, Any]]) -> tuple[list[str], list[str | None]]:
    ran = await run_interview(answers)
    return ran.questions, ran.told


async def test_each_question_asks_the_slot_the_interview_moves_to() -> None:
    answers: list[dict[str, Any]] = [
        {"need": "a CRM"},
        {"budget": {"min": 4000, "max": 4000, "currency": "USD"}},
    ]
    questions, told = await interview(answers)
    assert told == ["budget", "timeline"]
    assert questions == ["Model asks about budget?", "Model asks about timeline?"]


async def test_a_message_answering_something_else_gets_the_template_question() -> None:
    # Told "budget" next, but the lead answered the need and the budget at once: the machine
    # moves to the timeline, and the model's budget question would repeat an answer.
    answers = [{"need": "a CRM", "budget": {"min": 4000, "max": 4000, "currency": "USD"}}]
    questions, told = await interview(answers)
    assert told == ["budget"]
    assert questions == [QUESTIONS["timeline"]]


def test_the_likely_next_slot_skips_the_slot_asked_and_those_known() -> None:
    state = new_state(LEAD, TENANT, 0)
    assert likely_next_slot(state) == "budget"
    state = {**state, "asked": "timeline", "facts": {"need": "x", "budget": {"min": 1}}}
    assert likely_next_slot(cast(Any, state)) == "authority"


@pytest.mark.parametrize(
    ("message_type", "text", "answers"),
    [
        ("reaction", "[reaction] 👍", False),
        ("sticker", "[sticker]", False),
        ("image", "[image]", False),
        ("image", "[image] our budget is 4k", True),
        ("text", "We need a CRM", True),
        ("text", "   ", False),
    ],
)
def test_only_words_answer_an_interview_question(
    message_type: str, text: str, answers: bool
) -> None:
    # A 👍 took a turn: stored as the need, the questions used up, each a charged model call.
    assert is_answer(message_type, text) is answers


@pytest.mark.parametrize(("mailbox_connected", "email_configured"), [(False, True), (True, False)])
async def test_an_email_lead_nothing_can_reach_is_scored_but_asked_nothing(
    mailbox_connected: bool, email_configured: bool
) -> None:
    # The question failed at the send (no mailbox, or no Google client on the worker), the
    # model was paid to write it, and each one counted against the lead's six questions.
    answers: list[dict[str, Any]] = [
        {"need": "a CRM"},
        {"budget": {"min": 40_000, "max": 40_000, "currency": "USD"}},
        {"timeline": {"text": "this month", "days": 20}},
    ]
    ran = await run_interview(
        answers, channel="email", mailbox_connected=mailbox_connected,
        email_configured=email_configured,
    )  # fmt: skip
    assert ran.questions == []
    assert ran.told == [None, None, None]  # no question written
    assert ran.state is not None
    assert set(ran.state["facts"]) == {"need", "budget", "timeline"}
    assert ran.state["escalated"]  # still scored, and the rep still told
    assert ran.state["questions_asked"] == 0
    assert ran.state["status"] == "in_progress"
    assert [e["question_skipped"] for e in ran.lead_events] == ["no_mailbox"] * 3
    # Connected later: the interview asks from where it stands.
    later = await run_interview([{"authority": {"decision_maker": True}}], channel="email",
                                state=ran.state)  # fmt: skip
    assert later.told == ["authority"]  # its question wasted: the lead answered that one
    assert later.questions == [QUESTIONS["objections"]]
    assert later.state is not None
    assert later.state["questions_asked"] == 1
    assert "question_skipped" not in later.lead_events[0]


async def test_an_email_lead_of_a_connected_mailbox_is_asked() -> None:
    ran = await run_interview([{"need": "a CRM"}], channel="email")
    assert ran.questions == ["Model asks about budget?"]
