from typing import Any

import pytest

from connectors.ai import CircuitBreaker
from streams.rules.qualification import (
    MAX_QUESTIONS,
    SLOTS,
    Policy,
    advance,
    is_high_value,
    new_state,
    score,
)

POLICY = Policy(budget_threshold=5000, budget_currency="USD", escalation_days=30)
BUDGET = {"min": 8000, "max": 8000, "currency": "USD", "text": "$8k"}
SOON = {"days": 14, "text": "in 2 weeks"}
LATER = {"days": 120, "text": "in 4 months"}
BOSS = {"decision_maker": False, "approver": "boss", "text": "check with my boss"}
FOUNDER = {"decision_maker": True, "approver": None, "text": "I'm the founder"}


def step(state: Any, found: dict[str, Any], n: int) -> Any:
    result = advance(state, found, event_id=f"e{n}", now_ms=n, policy=POLICY)
    assert result is not None
    return result


def test_the_first_message_asks_for_the_need_when_it_says_nothing() -> None:
    result = step(new_state("l", "t", 0), {}, 1)
    assert result.question_slot == "need"
    assert result.state["turn"] == 1


@pytest.mark.parametrize(
    ("found", "next_slot", "turn"),
    [
        ({"need": "crm"}, "budget", 2),
        ({"need": "crm", "budget": BUDGET}, "timeline", 3),
        ({"need": "crm", "budget": BUDGET, "timeline": LATER}, "authority", 4),
        ({"need": "crm", "timeline": LATER}, "budget", 2),  # a skipped slot is asked next
        ({"need": "crm", "budget": BUDGET, "timeline": LATER, "authority": BOSS}, "objections", 5),
        (
            {"need": "crm", "budget": BUDGET, "timeline": LATER, "authority": BOSS,
             "objections": ["price"]},
            "next_step",
            6,
        ),
    ],
)  # fmt: skip
def test_answered_slots_are_skipped(found: dict[str, Any], next_slot: str, turn: int) -> None:
    result = step(new_state("l", "t", 0), found, 1)
    assert result.question_slot == next_slot
    assert result.state["turn"] == turn
    assert not result.completed


def test_all_slots_complete_the_interview() -> None:
    found = {
        "need": "crm", "budget": BUDGET, "timeline": LATER, "authority": BOSS,
        "objections": ["none"], "next_step": {"action": "demo", "when": "friday", "text": "demo"},
    }  # fmt: skip
    result = step(new_state("l", "t", 0), found, 1)
    assert result.completed
    assert result.question_slot is None
    assert result.state["status"] == "completed"
    assert step_after_completion(result.state) is None


def step_after_completion(state: Any) -> Any:
    return advance(state, {"need": "x"}, event_id="late", now_ms=9, policy=POLICY)


def test_six_questions_at_most() -> None:
    state: Any = new_state("l", "t", 0)
    for n in range(1, 20):
        result = advance(state, {}, event_id=f"e{n}", now_ms=n, policy=POLICY)
        if result is None:
            break
        state = result.state
    assert state["status"] == "completed"
    assert state["questions_asked"] == MAX_QUESTIONS


def test_a_repeated_message_is_not_applied_twice() -> None:
    first = step(new_state("l", "t", 0), {"need": "crm"}, 1)
    assert advance(first.state, {"budget": BUDGET}, event_id="e1", now_ms=2, policy=POLICY) is None


def test_a_high_value_lead_escalates_at_once_and_only_once() -> None:
    result = step(new_state("l", "t", 0), {"budget": BUDGET, "timeline": SOON}, 1)
    assert result.escalate
    assert not result.completed
    again = step(result.state, {"authority": FOUNDER}, 2)
    assert not again.escalate
    assert again.state["escalated"]


@pytest.mark.parametrize(
    ("facts", "high"),
    [
        ({"budget": BUDGET, "timeline": SOON}, True),
        ({"budget": BUDGET, "timeline": LATER}, False),
        ({"budget": {**BUDGET, "max": 4000, "min": 4000}, "timeline": SOON}, False),
        ({"budget": {**BUDGET, "currency": "INR"}, "timeline": SOON}, False),
        ({"budget": {**BUDGET, "currency": None}, "timeline": SOON}, True),
        ({"budget": BUDGET}, False),
    ],
)
def test_high_value_rule(facts: dict[str, Any], high: bool) -> None:
    assert is_high_value(facts, POLICY) is high


def test_score() -> None:
    assert score({}, POLICY) == 0
    full = {"budget": BUDGET, "timeline": SOON, "authority": FOUNDER,
            "next_step": {"action": "call"}}  # fmt: skip
    assert score(full, POLICY) == 100
    assert score({**full, "objections": ["price", "contract"]}, POLICY) == 90
    assert score({"authority": BOSS, "timeline": LATER}, POLICY) == 20


def test_slots_are_in_the_interview_order() -> None:
    assert SLOTS == ("need", "budget", "timeline", "authority", "objections", "next_step")


def test_circuit_breaker_opens_and_cools_down() -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=30)
    assert breaker.allows(0)
    breaker.record_failure(0)
    assert breaker.allows(1)
    breaker.record_failure(1)
    assert not breaker.allows(2)
    assert breaker.allows(31)
    breaker.record_success()
    assert breaker.allows(32)


def test_after_the_cool_down_one_trial_call_decides() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=30)
    for now in (0, 1, 2):
        breaker.record_failure(now)
    assert not breaker.allows(10)
    assert breaker.allows(33)  # the trial
    assert not breaker.allows(34)  # the others meanwhile
    breaker.record_failure(35)  # one failed trial opens it again, not three
    assert not breaker.allows(36)
    assert breaker.allows(66)
    breaker.record_success()
    assert breaker.allows(67)
    assert breaker.allows(67)
    # A trial that never reported (cancelled) is given up after a cool-down.
    for now in (70, 71, 72):
        breaker.record_failure(now)
    assert breaker.allows(103)
    assert not breaker.allows(120)
    assert breaker.allows(134)


def test_a_slot_left_unanswered_is_asked_again_only_after_every_other() -> None:
    # Re-asking the budget used up the six questions: the interview ended without ever asking
    # about objections or the next step.
    state: Any = new_state("l", "t", 0)
    asked = []
    for n, found in enumerate([{"need": "a CRM"}, {}, {}, {}, {}, {}, {}], start=1):
        result = advance(state, found, event_id=f"e{n}", now_ms=n, policy=POLICY)
        if result is None:
            break
        state = result.state
        asked.append(result.question_slot)
    assert asked == ["budget", "timeline", "authority", "objections", "next_step", "budget", None]
    assert state["status"] == "completed"


def test_a_state_written_before_asks_were_kept_goes_on() -> None:
    old: Any = {**new_state("l", "t", 0)}
    del old["slot_asks"]
    assert step(old, {"need": "a CRM"}, 1).question_slot == "budget"


def test_a_lead_nothing_can_reach_is_asked_nothing_and_its_messages_count_as_turns() -> None:
    # Each message still pays for an extraction: the six turns bound them as questions did.
    state: Any = step(new_state("l", "t", 0), {}, 1).state  # "need" asked while reachable
    steps = []
    for n in range(2, 20):
        result = advance(state, {}, event_id=f"e{n}", now_ms=n, policy=POLICY, can_ask=False)
        if result is None:
            break
        steps.append(result)
        state = result.state
    assert [s.question_slot for s in steps] == [None] * 6
    assert [s.completed for s in steps] == [False] * 5 + [True]
    assert (state["questions_asked"], state["unasked_turns"]) == (1, 5)
    assert steps[-2].state["asked"] == "need"  # the last question the lead saw
    assert state["status"] == "completed"


def test_a_lead_nothing_can_reach_completes_once_every_slot_is_answered() -> None:
    found = {
        "need": "crm", "budget": BUDGET, "timeline": LATER, "authority": BOSS,
        "objections": ["none"], "next_step": {"action": "demo", "when": "friday", "text": "demo"},
    }  # fmt: skip
    done = advance(new_state("l", "t", 0), found, event_id="all", now_ms=30, policy=POLICY,
                   can_ask=False)  # fmt: skip
    assert done is not None
    assert done.completed
    assert done.state["asked"] is None
    assert "unasked_turns" not in done.state
