from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.extractor_eval import evaluate
from streams.rules import extraction
from streams.rules.extraction import (
    extract,
    extract_authority,
    extract_budget,
    extract_objections,
    extract_timeline,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "low", "high", "currency"),
    [
        ("$5k-10k", 5_000, 10_000, "USD"),
        ("under 2 lakh", None, 200_000, "INR"),
        ("around 50,000 rupees", 50_000, 50_000, "INR"),
        ("budget of 3 crore", 30_000_000, 30_000_000, "INR"),
        ("₹40k per month", 40_000, 40_000, "INR"),
        ("at least €2,000", 2_000, None, "EUR"),
        ("5 to 10 lakhs", 500_000, 1_000_000, "INR"),
        ("between 5k and 10k", 5_000, 10_000, None),
        # Each was read as another number of the message.
        ("go live in 2-3 months, budget around 10k", 10_000, 10_000, None),
        ("Our budget for 2025 is $20k", 20_000, 20_000, "USD"),
        ("call me at 9876543210, budget 5 lakh", 500_000, 500_000, "INR"),
        ("3 reps and 2 managers, budget 4k", 4_000, 4_000, None),
        ("Budget 10k and 3 months", 10_000, 10_000, None),
        ("about 5000€", 5_000, 5_000, "EUR"),
        ("Team of 10 and $20k budget", 20_000, 20_000, "USD"),
        ("we are 5 and 10k is our budget", 10_000, 10_000, None),
        ("Our budget is 10,00,000", 1_000_000, 1_000_000, None),
        ("budget 1,500,000", 1_500_000, 1_500_000, None),
        ("Our budget is 2000", 2_000, 2_000, None),
        ("budget is 1000000", 1_000_000, 1_000_000, None),
    ],
)
def test_budgets(text: str, low: float | None, high: float | None, currency: str) -> None:
    budget = extract_budget(text)
    assert budget is not None
    assert (budget.min_amount, budget.max_amount, budget.currency) == (low, high, currency)


@pytest.mark.parametrize(
    "text",
    ["a team of 50 people", "in 2 weeks", "we get 300 leads a day", "Q3", "at 3pm", "version 2"],
)
def test_numbers_that_are_not_budgets(text: str) -> None:
    assert extract_budget(text) is None


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("next month", 45),
        ("Q3", 219),
        ("in 2 weeks", 14),
        ("asap", 3),
        ("within a month", 30),
        ("in a couple of weeks", 14),
        ("by March", 97),
    ],
)
def test_timelines(text: str, days: int) -> None:
    timeline = extract_timeline(text, NOW)
    assert timeline is not None
    assert timeline.days == days


def test_a_relative_timeline_has_at_most_four_digits() -> None:
    timeline = extract_timeline("in 9999 days", NOW)
    assert timeline is not None
    assert timeline.days == 9999
    # Past what the qualification table's JSON holds (2**64), or Python's int-parsing limit.
    assert extract_timeline("in 99999999999999999999 days", NOW) is None
    assert extract_timeline("in " + "9" * 5000 + " days", NOW) is None


def test_no_rush_is_a_timeline_without_a_date() -> None:
    timeline = extract_timeline("no rush, just exploring", NOW)
    assert timeline is not None
    assert timeline.days is None


@pytest.mark.parametrize(
    ("text", "decides", "approver"),
    [
        ("I need to check with my boss", False, "boss"),
        ("I'm the founder", True, None),
        ("will run it by our CFO", False, "cfo"),
        ("it's my call", True, None),
    ],
)
def test_authority(text: str, decides: bool, approver: str | None) -> None:
    authority = extract_authority(text)
    assert authority is not None
    assert authority.decision_maker is decides
    assert authority.approver == approver


@pytest.mark.parametrize(
    "text",
    [
        # A lead asking a question is no lead waiting for approval; a lead booking "my call" is
        # no decision maker for it.
        "Can I ask what the Pro plan costs?",
        "I wanted to ask about your Pro plan",
        "Yes, book my call for Tuesday 3pm",
    ],
)
def test_words_that_only_look_like_authority(text: str) -> None:
    assert extract_authority(text) is None


def test_curly_apostrophes_read_like_straight_ones() -> None:
    # Typed on a phone: none of these matched.
    found = extract("I\u2019m the CEO and we can\u2019t afford much", NOW).slots()
    assert found["authority"]["decision_maker"] is True
    assert found["objections"] == ["price"]


def test_objections_and_a_message_filling_several_slots() -> None:
    assert extract_objections("too expensive and we already use Zoho") == ["price", "competitor"]
    found = extract(
        "Budget approx 15 lakhs, decision by end of this month, I am the MD. Can we do a demo "
        "on Friday?",
        NOW,
    ).slots()
    assert set(found) == {"budget", "timeline", "authority", "next_step"}


def test_the_free_text_answer_to_the_need_question_is_the_need() -> None:
    assert extract("We lose WhatsApp leads at night", NOW, expecting="need").need
    assert extract("hello!", NOW, expecting="need").need is None
    assert extract("We lose WhatsApp leads at night", NOW, expecting="budget").need is None


def test_labelled_set_precision() -> None:
    scores = evaluate()
    assert scores["budget"].precision >= 0.9
    assert scores["timeline"].precision >= 0.9
    assert all(score.recall >= 0.8 for score in scores.values())


# The fast paths (streams.rules.extraction._may_match and the one-search prefilters) must never
# turn away a message the full patterns would read: texts built from the patterns' own words,
# in any case, with digits, punctuation and non-ASCII letters folded differently by `re`.
_WORDS = [
    "too expensive", "Discount", "HubSpot", "already using", "security", "API", "contract",
    "demo", "Proposal", "meeting", "call", "tomorrow", "3 PM", "let's", "check with",
    "my BOSS decides", "I'm the founder", "sign-off", "Not my call", "asap", "next WEEK",
    "end of the year", "no rush", "budget", "5k", "₹2 lakh", "$5,000", "in 2 weeks", "Q3",
    "by March", "\u017fecurity", "\u0130ntegration", "\u212a", "ß", "Straße", "hello",
    "!", ",", " ",
]  # fmt: skip
_texts = st.lists(st.one_of(st.sampled_from(_WORDS), st.text(max_size=6)), max_size=8).map(" ".join)


@given(_texts)
def test_prefilters_never_turn_away_a_match(text: str) -> None:
    lowered = text.lower()
    for pattern, lowered_pattern in [
        (extraction._ANY_OBJECTION, extraction._ANY_OBJECTION_LOWERED),
        (extraction._ANY_NEXT_STEP, extraction._ANY_NEXT_STEP_LOWERED),
        (extraction._NEEDS_APPROVAL, extraction._NEEDS_APPROVAL_LOWERED),
        (extraction._DECIDES, extraction._DECIDES_LOWERED),
    ]:
        found = pattern.search(text) is not None
        may_match = extraction._may_match(pattern, lowered_pattern, text, lowered)
        assert may_match or not found
        if text.isascii():
            assert may_match == found
    if any(pattern.search(lowered) for pattern, _ in extraction._PHRASES):
        assert extraction._ANY_PHRASE.search(lowered)
    if extraction._AMOUNT_RE.search(text):
        assert extraction._DIGIT.search(text)


@pytest.mark.parametrize(
    ("text", "days"),
    [
        # The list's order won and the negation was not read: 20 days, and an escalation.
        ("Not this month, maybe next quarter", 100),
        ("we can't start this month, maybe next quarter", 100),
        ("this month", 20),
    ],
)
def test_a_negated_timeline_is_not_the_lead_s(text: str, days: int) -> None:
    timeline = extract_timeline(text, NOW)
    assert timeline is not None
    assert timeline.days == days


def test_only_a_negated_timeline_is_none() -> None:
    assert extract_timeline("not this week", NOW) is None
    # "Not until" is a timeline, not its negation.
    until = extract_timeline("not until next month", NOW)
    assert until is not None
    assert until.days == 45
