"""The six-turn qualification interview as a pure state machine, and the lead score.

Turns ask, in order: 1 need and pain point, 2 budget, 3 timeline, 4 decision authority,
5 objections and concerns, 6 next steps. Each answer may fill several slots; the next question
is the first slot still empty, so answered slots are skipped. The interview completes when
every slot is filled or six questions have been asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

SLOTS = ("need", "budget", "timeline", "authority", "objections", "next_step")
MAX_QUESTIONS = 6
RECENT_IDS_KEPT = 32

QUESTIONS = {
    "need": "Thanks for reaching out! What problem are you hoping to solve, and what is it "
    "costing you today?",
    "budget": "Got it. What budget range do you have in mind for this?",
    "timeline": "When would you like to have this up and running?",
    "authority": "Who else is involved in making this decision?",
    "objections": "Is there anything that worries you or could stop you from going ahead?",
    "next_step": "Would a short call or a demo be useful? What day and time suit you?",
}


class QualificationState(TypedDict):
    lead_id: str
    tenant_id: str
    status: str  # in_progress | completed
    turn: int  # the slot being asked, 1..6 (6 also once completed)
    asked: str | None  # the slot of the last question sent
    questions_asked: int
    facts: dict[str, Any]
    score: float
    escalated: bool
    sdr_id: str | None
    first_message_ms: int
    updated_ms: int
    recent_event_ids: list[str]
    # Questions asked per slot (absent in states written before it was kept).
    slot_asks: NotRequired[dict[str, int]]
    # Messages applied when no question could reach the lead (absent when none): they count
    # against the six as questions do, or such a lead's every message paid for an extraction.
    unasked_turns: NotRequired[int]


@dataclass(frozen=True)
class Policy:
    """Per-tenant numbers of the score and the escalation rule."""

    budget_threshold: float
    budget_currency: str
    escalation_days: int


@dataclass(frozen=True)
class Step:
    state: QualificationState
    question_slot: str | None
    escalate: bool
    completed: bool


def new_state(lead_id: str, tenant_id: str, now_ms: int) -> QualificationState:
    return QualificationState(
        lead_id=lead_id,
        tenant_id=tenant_id,
        status="in_progress",
        turn=1,
        asked=None,
        questions_asked=0,
        facts={},
        score=0.0,
        escalated=False,
        sdr_id=None,
        first_message_ms=now_ms,
        updated_ms=now_ms,
        recent_event_ids=[],
        slot_asks={},
    )


def merge_facts(facts: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """Later answers refine earlier ones; objections accumulate."""
    merged = dict(facts)
    for slot, value in found.items():
        if slot == "objections":
            known = [o for o in merged.get("objections", []) if o != "none"]
            new = [o for o in value if o not in known]
            merged["objections"] = (known + new) or value
        else:
            merged[slot] = value
    return merged


def timeline_days(facts: dict[str, Any]) -> int | None:
    timeline = facts.get("timeline")
    return None if timeline is None else timeline.get("days")


def budget_upper(facts: dict[str, Any]) -> tuple[float | None, str | None]:
    budget = facts.get("budget")
    if budget is None:
        return None, None
    upper = budget.get("max") if budget.get("max") is not None else budget.get("min")
    return upper, budget.get("currency")


def score(facts: dict[str, Any], policy: Policy) -> float:
    """0-100: budget against the threshold (40), timeline urgency (30), authority (20), an agreed
    next step (10), minus 5 per objection."""
    points = 0.0
    upper, currency = budget_upper(facts)
    if upper is not None and currency in (None, policy.budget_currency):
        points += 40 * min(1.0, upper / policy.budget_threshold)
    days = timeline_days(facts)
    if days is not None:
        points += 30 if days <= 30 else 20 if days <= 90 else 10
    authority = facts.get("authority")
    if authority is not None:
        points += 20 if authority.get("decision_maker") else 10
    if facts.get("next_step"):
        points += 10
    objections = [o for o in facts.get("objections", []) if o != "none"]
    return round(max(0.0, points - 5 * len(objections)), 1)


def is_high_value(facts: dict[str, Any], policy: Policy) -> bool:
    """Budget at or above the threshold (same currency, or none stated) and a timeline within
    the escalation window."""
    upper, currency = budget_upper(facts)
    days = timeline_days(facts)
    return (
        upper is not None
        and currency in (None, policy.budget_currency)
        and upper >= policy.budget_threshold
        and days is not None
        and days <= policy.escalation_days
    )


# Message types that carry no words (channels' reactions, stickers, shared places and cards).
_WORDLESS_TYPES = frozenset({"reaction", "sticker", "location", "contacts", "unsupported"})
# Media types whose words are their caption, after the "[kind]" the channel gives the text.
_MEDIA_TYPES = frozenset({"image", "video", "document", "audio", "file"})


def is_answer(message_type: str, text: str) -> bool:
    """Whether a message can answer an interview question. A 👍 or a sticker took a turn: it
    was stored as the lead's need, used up the questions, and each was a charged model call."""
    if message_type in _WORDLESS_TYPES:
        return False
    if message_type in _MEDIA_TYPES:
        text = text.removeprefix(f"[{message_type}]")
    return bool(text.strip())


def likely_next_slot(state: QualificationState) -> str | None:
    """The slot `advance` asks next if the message answers the slot just asked (and nothing
    else): what a model writing the next question is told to ask, before it has read the
    message. Its question is used only when `advance` does pick this slot."""
    asked = state["asked"] or "need"
    missing = [slot for slot in SLOTS if slot not in state["facts"] and slot != asked]
    if not missing or _turns_taken(state) >= MAX_QUESTIONS:
        return None
    asks = state.get("slot_asks", {})
    return min(missing, key=lambda s: (asks.get(s, 0), SLOTS.index(s)))


def advance(
    state: QualificationState,
    found: dict[str, Any],
    *,
    event_id: str,
    now_ms: int,
    policy: Policy,
    can_ask: bool = True,
) -> Step | None:
    """The interview after one customer message; None when the message was already applied or
    the interview is over.

    Without `can_ask` (no way to reach the lead: an e-mail lead of a tenant with no mailbox),
    the message's facts are kept and scored but no question is picked or counted: the
    interview goes on when the lead writes again, and asks once it can."""
    if state["status"] != "in_progress" or event_id in state["recent_event_ids"]:
        return None
    facts = merge_facts(state["facts"], found)
    missing = [slot for slot in SLOTS if slot not in facts]
    completed = not missing or _turns_taken(state) >= MAX_QUESTIONS
    asks = dict(state.get("slot_asks", {}))
    # The missing slot asked least, then in interview order: a slot the lead does not answer
    # is asked again only once every other was asked (re-asking the budget used up the
    # questions, and the interview ended without the objections or the next step).
    question = (
        None
        if completed or not can_ask
        else min(missing, key=lambda s: (asks.get(s, 0), SLOTS.index(s)))
    )
    if question is not None:
        asks[question] = asks.get(question, 0) + 1
    escalate = not state["escalated"] and is_high_value(facts, policy)
    if question is not None:
        turn, asked = SLOTS.index(question) + 1, question
    elif completed:
        turn, asked = MAX_QUESTIONS, None
    else:  # nothing asked this time: the last question is still the one the lead saw
        turn, asked = state["turn"], state["asked"]
    updated = QualificationState(
        lead_id=state["lead_id"],
        tenant_id=state["tenant_id"],
        status="completed" if completed else "in_progress",
        turn=turn,
        asked=asked,
        questions_asked=state["questions_asked"] + (1 if question else 0),
        facts=facts,
        score=score(facts, policy),
        escalated=state["escalated"] or escalate,
        sdr_id=state["sdr_id"],
        first_message_ms=state["first_message_ms"],
        updated_ms=now_ms,
        recent_event_ids=[*state["recent_event_ids"], event_id][-RECENT_IDS_KEPT:],
        slot_asks=asks,
    )
    unasked_turns = state.get("unasked_turns", 0) + (0 if can_ask or completed else 1)
    if unasked_turns:
        updated["unasked_turns"] = unasked_turns
    return Step(updated, question, escalate, completed)


def _turns_taken(state: QualificationState) -> int:
    return state["questions_asked"] + state.get("unasked_turns", 0)
