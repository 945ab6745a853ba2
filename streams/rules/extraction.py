# ruff: noqa: E501, RUF001  (pattern tables read best one per line; the en dash is matched on purpose)
"""The built-in extractor: qualification facts from a message, with no model and no I/O.

It favours precision over recall: a budget is read only from an amount that carries a currency
or a money multiplier (k, lakh, crore, million) or sits next to a budget word, so "a team of 50"
or "in 2 weeks" never become budgets.

Known limits: one budget and one timeline per message (the first found); spelled-out numbers
("fifty thousand") and relative dates beyond the patterns below ("after Diwali") are not read;
negations ("we do NOT have a budget of 5k") are not understood; objections and next steps are
keyword classes, not intent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any


# Python's case-insensitive matching compares every character through its lower case, and the
# searches below took 38 us for a one-line message (5 % of a worker's CPU on a backlog). Most
# messages answer none of them, so each is first asked of the lower-cased text with the same
# pattern compiled case-sensitively: for ASCII text that is the same search, and only a hit
# runs the case-insensitive one (whose match the extractor reports as written). Other text
# keeps the case-insensitive search alone: its case folding (the long s is an "s", the dotted
# capital I an "i") is not `str.lower`'s.
def _case_sensitive(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """`pattern` (its letters all lower case) without IGNORECASE, for lower-cased text."""
    return re.compile(pattern.pattern, pattern.flags & ~re.IGNORECASE)


def _may_match(
    pattern: re.Pattern[str], lowered_pattern: re.Pattern[str], text: str, lowered: str
) -> bool:
    """False only where `pattern` (case-insensitive) finds nothing in `text`."""
    if text.isascii():
        return lowered_pattern.search(lowered) is not None
    return pattern.search(text) is not None


# ----------------------------------------------------------------------------- budget

_CURRENCY_WORDS = {
    "$": "USD", "usd": "USD", "dollar": "USD", "dollars": "USD", "bucks": "USD",
    "₹": "INR", "rs": "INR", "rs.": "INR", "inr": "INR", "rupee": "INR", "rupees": "INR",
    "€": "EUR", "eur": "EUR", "euro": "EUR", "euros": "EUR",
    "£": "GBP", "gbp": "GBP", "pound": "GBP", "pounds": "GBP",
}  # fmt: skip
_MULTIPLIERS = {
    "k": 1_000, "thousand": 1_000, "grand": 1_000,
    "m": 1_000_000, "mn": 1_000_000, "million": 1_000_000, "mil": 1_000_000,
    "lakh": 100_000, "lakhs": 100_000, "lac": 100_000, "lacs": 100_000, "l": 100_000,
    "crore": 10_000_000, "crores": 10_000_000, "cr": 10_000_000,
}  # fmt: skip
_INDIAN_MULTIPLIERS = {"lakh", "lakhs", "lac", "lacs", "l", "crore", "crores", "cr"}

_PREFIX = r"(?P<cur1>\$|₹|€|£|rs\.?|inr|usd|eur|gbp)?\s*"
_NUMBER = r"(?P<num{n}>\d{{1,3}}(?:,\d{{2,3}})+|\d+(?:\.\d+)?)"
_MULT = r"\s*(?P<mult{n}>k|thousand|grand|mn|million|mil|m|lakhs?|lacs?|l|crores?|cr)?\b"
_SUFFIX = r"\s*(?P<cur2>dollars?|bucks|usd|rupees?|inr|euros?|eur|pounds?|gbp|\$|₹|€|£)?"
_AMOUNT_RE = re.compile(
    _PREFIX
    + _NUMBER.format(n=1)
    + _MULT.format(n=1)
    + r"(?:\s*(?P<join>-|–|to|and)\s*(?P<cur3>\$|₹|€|£|rs\.?)?\s*"
    + _NUMBER.format(n=2)
    + _MULT.format(n=2)
    + r")?"
    + _SUFFIX,
    re.IGNORECASE,
)
_UNITS_AFTER = re.compile(
    r"^\s*(?:days?|weeks?|months?|years?|yrs?|hours?|hrs?|mins?|minutes?|people|persons?|users?|"
    r"seats?|employees?|agents?|reps?|members?|leads?|messages?|%|percent|x\b|pm|am|th|st|nd|rd)",
    re.IGNORECASE,
)
_BUDGET_WORDS = re.compile(
    r"\b(budget|spend|afford|pay|price|pricing|cost|invest|allocated?|range|ballpark)\b",
    re.IGNORECASE,
)
# Every amount has a digit (`_NUMBER`); most messages have none.
_DIGIT = re.compile(r"\d")
_UPPER = re.compile(
    r"(under|below|less than|up ?to|max(?:imum)?|within|not more than|no more than)\s*$", re.I
)
_LOWER = re.compile(r"(at least|minimum|min|over|above|more than|starting at|from)\s*$", re.I)


@dataclass(frozen=True, slots=True)
class Budget:
    min_amount: float | None
    max_amount: float | None
    currency: str | None
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "min": self.min_amount,
            "max": self.max_amount,
            "currency": self.currency,
            "text": self.text,
        }

    @property
    def upper(self) -> float | None:
        return self.max_amount if self.max_amount is not None else self.min_amount


def _number(text: str) -> float:
    return float(text.replace(",", ""))


# A year ("our budget for 2025") or a phone number ("call me at 9876543210, budget 5 lakh"):
# a bare number of these shapes, without a currency or a multiplier, is no amount.
_YEAR = re.compile(r"^(?:19|20)\d\d$")
_PHONE_LIKE = re.compile(r"^\+?\d{7,}$")
_BEFORE_YEAR = re.compile(r"\b(?:for|in|by|since|until|of|from|to|year)\s*$", re.IGNORECASE)
_BEFORE_PHONE = re.compile(
    r"\b(?:call|phone|mobile|cell|whatsapp|number|no\.?|tel|contact|at|on|me)\s*:?\s*\+?$",
    re.IGNORECASE,
)
_BETWEEN = re.compile(r"\bbetween\s*\S*\s*$", re.IGNORECASE)


def extract_budget(text: str) -> Budget | None:
    """The budget a message states. An amount with a currency or a multiplier wins over one
    only near a budget word ("3 reps and 2 managers, budget 4k" is 4,000, not 2)."""
    if not _DIGIT.search(text):
        return None
    weak: Budget | None = None
    position = 0
    while (match := _AMOUNT_RE.search(text, position)) is not None:
        position = match.end()
        raw1, raw2 = match["num1"], match["num2"]
        mult1 = (match["mult1"] or "").lower()
        mult2 = (match["mult2"] or "").lower()
        currency_mark = match["cur1"] or match["cur2"] or match["cur3"]
        before = text[max(0, match.start() - 40) : match.start()]
        if raw2 and match["join"].lower() == "and" and not _BETWEEN.search(before):
            # "10k and 3 months": two things, not a range (unless "between 5k and 10k"); the
            # second, with its own currency, is read on its own next.
            raw2, mult2, currency_mark = None, "", match["cur1"]
            position = match.start("cur3") if match["cur3"] else match.start("num2")
            after = text[match.end("mult1") if match["mult1"] else match.end("num1") :]
        else:
            after = text[match.end() :]
        # Ranges too: "go live in 2-3 months" is no budget of 2 to 3.
        if not mult1 and not mult2 and _UNITS_AFTER.match(after):
            continue
        if mult1 == "m" and _UNITS_AFTER.match(after):
            continue
        has_context = bool(_BUDGET_WORDS.search(before + " " + after[:20]))
        strong = bool(currency_mark or mult1 or mult2)
        if not (strong or has_context):
            continue
        # "l" and "m" alone are too ambiguous without a currency or budget word.
        if mult1 in {"l", "m"} and not (currency_mark or has_context):
            continue
        # "Our budget for 2025", "call me at 9876543210": a year or a phone number, by the
        # word before it; "budget is 2000" stays an amount.
        if (
            not strong
            and not raw2
            and (
                (_YEAR.match(raw1) and _BEFORE_YEAR.search(before))
                or (_PHONE_LIKE.match(raw1) and _BEFORE_PHONE.search(before))
            )
        ):
            continue
        value1 = _number(raw1)
        if value1 == 0:
            continue
        # In "5-10k" the multiplier of the upper bound applies to the lower one too.
        factor1 = _MULTIPLIERS.get(mult1) or _MULTIPLIERS.get(mult2, 1)
        amount1 = value1 * factor1
        amount2 = _number(raw2) * _MULTIPLIERS.get(mult2 or mult1, 1) if raw2 else None
        currency = _CURRENCY_WORDS.get((currency_mark or "").lower().rstrip())
        if currency is None and (mult1 in _INDIAN_MULTIPLIERS or mult2 in _INDIAN_MULTIPLIERS):
            currency = "INR"
        phrase = (
            match.group(0).strip()
            if raw2 or not match["join"]
            else text[
                match.start() : match.end("mult1") if match["mult1"] else match.end("num1")
            ].strip()
        )
        if amount2 is not None:
            low, high = sorted((amount1, amount2))
            found = Budget(low, high, currency, phrase)
        elif _UPPER.search(before):
            found = Budget(None, amount1, currency, phrase)
        elif _LOWER.search(before):
            found = Budget(amount1, None, currency, phrase)
        else:
            found = Budget(amount1, amount1, currency, phrase)
        if strong:
            return found
        weak = weak or found
    return weak


# ----------------------------------------------------------------------------- timeline

_MONTHS = {
    name: index
    for index, names in enumerate(
        [
            ("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"),
            ("may",), ("june", "jun"), ("july", "jul"), ("august", "aug"),
            ("september", "sep", "sept"), ("october", "oct"), ("november", "nov"),
            ("december", "dec"),
        ],
        start=1,
    )
    for name in names
}  # fmt: skip
_WORD_NUMBERS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "couple of": 2, "a couple of": 2, "few": 3, "a few": 3, "couple": 2,
}  # fmt: skip
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}


@dataclass(frozen=True, slots=True)
class Timeline:
    days: int | None
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"days": self.days, "text": self.text}


def _days_until(today: date, target: date) -> int:
    return max(0, (target - today).days)


# Compiled once: built and looked up in `re`'s cache on every message, the patterns (the month
# alternation alone is some 150 characters, hashed each time) cost more than matching them.
_RELATIVE = re.compile(
    r"\b(?:in|within|next|over the next|in the next|about|around|have|got|only)\s+"
    # At most four digits: "in 99999999999999999999 days" is no timeline, and its number was
    # past what the qualification table's JSON can hold (or Python's int-parsing limit).
    r"(\d{1,4}|a few|a couple of|couple of|few|a|an|one|two|three|four|five|six)\s+"
    r"(day|week|month|year)s?\b"
)
_QUARTER = re.compile(r"\b(?:in |by |during |for )?q([1-4])\b")
_MONTH = re.compile(
    r"\b(?:by|before|in|from|starting|start of|early|mid|end of)\s+(" + "|".join(_MONTHS) + r")\b"
)


def _fixed(days: int | None) -> Callable[[date], int | None]:
    return lambda today: days


def _rest_of_year(today: date) -> int:
    return _days_until(today, date(today.year, 12, 31))


# In order: the first that matches gives the timeline, its days counted from today (None: the
# lead is in no rush).
_PHRASES: list[tuple[re.Pattern[str], Callable[[date], int | None]]] = [
    (re.compile(pattern), days)
    for pattern, days in [
        (r"\b(asap|as soon as possible|immediately|urgent(?:ly)?|right away)\b", _fixed(3)),
        (r"\bthis week\b", _fixed(5)),
        (r"\bnext week\b", _fixed(10)),
        (r"\b(?:this month|end of (?:the |this )?month)\b", _fixed(20)),
        (r"\bnext month\b", _fixed(45)),
        (r"\bnext quarter\b", _fixed(100)),
        (r"\b(?:this|end of (?:the )?)quarter\b", _fixed(60)),
        (r"\bnext year\b", _fixed(365)),
        (r"\b(?:by |before )?(?:the )?end of (?:the |this )?year\b", _rest_of_year),
        (r"\b(no rush|no hurry|not (?:in a|any) hurry|just exploring|just looking|no timeline|not sure when)\b", _fixed(None)),
    ]
]  # fmt: skip
_ANY_PHRASE = re.compile("|".join(f"(?:{pattern.pattern})" for pattern, _ in _PHRASES))


def extract_timeline(text: str, now: datetime, lowered: str | None = None) -> Timeline | None:
    lowered = text.lower() if lowered is None else lowered
    today = now.date()
    relative = _RELATIVE.search(lowered)
    if relative:
        count = relative[1]
        number = int(count) if count.isdigit() else _WORD_NUMBERS[count]
        return Timeline(number * _UNIT_DAYS[relative[2]], relative.group(0))
    quarter = _QUARTER.search(lowered)
    if quarter:
        q = int(quarter[1])
        start = date(today.year, 3 * (q - 1) + 1, 1)
        if start < date(today.year, 3 * ((today.month - 1) // 3) + 1, 1):
            start = date(today.year + 1, start.month, 1)
        return Timeline(_days_until(today, start), quarter.group(0).strip())
    month = _MONTH.search(lowered)
    if month:
        number = _MONTHS[month[1]]
        year = today.year if number >= today.month else today.year + 1
        return Timeline(_days_until(today, date(year, number, 1)), month.group(0))
    if not _ANY_PHRASE.search(lowered):
        return None
    # The first phrase of the text that is not negated: "not this month, maybe next quarter"
    # was this month (the list's order won, and the negation was not read).
    said: list[tuple[int, int, Timeline]] = []
    for rank, (pattern, days) in enumerate(_PHRASES):
        for found in pattern.finditer(lowered):
            if not _NEGATED.search(lowered[max(0, found.start() - 12) : found.start()]):
                said.append((found.start(), rank, Timeline(days(today), found.group(0))))
                break
    return min(said, key=lambda s: (s[0], s[1]))[2] if said else None


_NEGATED = re.compile(r"(?:\bnot|\bno|n't)\s+(?!until\b|before\b|later\b)(?:\w+\s+)?$")


# ----------------------------------------------------------------------------- authority

_NEEDS_APPROVAL = re.compile(
    r"\b(check with|ask (?:my|our|the)\b|talk to|speak (?:to|with)|run it by|discuss with|consult|loop in|"
    r"get approval|need approval|needs approval|approval from|sign[- ]off|not my (?:call|decision)|"
    r"not the decision maker|i don'?t decide|(?:my|our) (?:boss|manager|ceo|cfo|cto|founder|"
    r"director|head|team lead|partner|management|committee|board) (?:decides|will decide|"
    r"has to|needs to|approves|signs))",
    re.IGNORECASE,
)
_APPROVER = re.compile(
    r"\b(boss|manager|ceo|cfo|cto|founder|co-?founder|director|partner|management|committee|"
    r"board|team|head of \w+|finance|procurement|owner)\b",
    re.IGNORECASE,
)
_DECIDES = re.compile(
    r"\b(i'?m|i am|am the|as the|being the)\s+(?:the\s+)?(founder|co-?founder|ceo|cto|cfo|coo|owner|"
    r"proprietor|md|managing director|director|president|vp|head of [a-z]+|decision[- ]maker)\b|"
    r"\b(i decide|i make the (?:call|decision)|(?:it'?s|it is|that'?s|that is) my (?:call|decision)|"
    r"i own the budget|i sign off|"
    r"i can sign|i have (?:the )?authority|final say is mine|i have the final say|i approve)\b",
    re.IGNORECASE,
)


_NOT_NEED = re.compile(r"\b(?:not|n't)\s+need\b", re.I)
_NEEDS_APPROVAL_LOWERED = _case_sensitive(_NEEDS_APPROVAL)
_DECIDES_LOWERED = _case_sensitive(_DECIDES)


@dataclass(frozen=True, slots=True)
class Authority:
    decision_maker: bool
    approver: str | None
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"decision_maker": self.decision_maker, "approver": self.approver, "text": self.text}


def extract_authority(text: str, lowered: str | None = None) -> Authority | None:
    lowered = text.lower() if lowered is None else lowered
    needs = (
        _NEEDS_APPROVAL.search(text)
        if _may_match(_NEEDS_APPROVAL, _NEEDS_APPROVAL_LOWERED, text, lowered)
        else None
    )
    if needs and not _NOT_NEED.search(text[max(0, needs.start() - 12) : needs.start()]):
        approver = _APPROVER.search(text, needs.start())
        return Authority(False, approver[1].lower() if approver else None, needs.group(0))
    if not _may_match(_DECIDES, _DECIDES_LOWERED, text, lowered):
        return None
    decides = _DECIDES.search(text)
    if decides:
        return Authority(True, None, decides.group(0))
    return None


# ----------------------------------------------------------------------------- objections

_OBJECTIONS = {
    "price": r"too (?:expensive|costly|pricey|much)|expensive|costly|pricey|over (?:our|my) budget|"
    r"out of (?:our|my) budget|can'?t afford|cheaper|discount",
    "competitor": r"already (?:use|using|have)|competitor|currently (?:use|using)|switch(?:ing)? from|"
    r"current (?:tool|solution|vendor|provider|system|crm)|"
    r"compared to|vs\.?|versus|other vendor|another vendor|hubspot|salesforce|zoho|freshworks",
    "timing": r"not (?:right )?now|not a priority|bad time|too busy|maybe later|next year maybe|"
    r"maybe next year|not ready",
    "security": r"security|privacy|gdpr|data protection|compliance|secure|breach",
    "integration": r"integrat|compatib|work with our|api|migration|migrate",
    "contract": r"contract|lock[- ]?in|long[- ]term commitment|cancel(?:lation)?|annual commitment",
    "trust": r"not sure (?:if|it|this) (?:will )?work|skeptic|doubt|proof|case stud|references?|"
    r"guarantee|refund",
}  # fmt: skip
_OBJECTION_RES = {
    name: re.compile(rf"\b(?:{pattern})", re.IGNORECASE) for name, pattern in _OBJECTIONS.items()
}
# Most messages raise no objection: one search tells, instead of one per class.
_ANY_OBJECTION = re.compile(
    "|".join(pattern.pattern for pattern in _OBJECTION_RES.values()), re.IGNORECASE
)
_ANY_OBJECTION_LOWERED = _case_sensitive(_ANY_OBJECTION)


def extract_objections(text: str, lowered: str | None = None) -> list[str]:
    lowered = text.lower() if lowered is None else lowered
    if not _may_match(_ANY_OBJECTION, _ANY_OBJECTION_LOWERED, text, lowered):
        return []
    return [name for name, pattern in _OBJECTION_RES.items() if pattern.search(text)]


# ----------------------------------------------------------------------------- next step

_NEXT_STEPS = [
    (action, re.compile(pattern, re.IGNORECASE))
    for action, pattern in [
        ("demo", r"\bdemo\b|walk ?through|show me (?:how|the product)|trial"),
        ("proposal", r"\b(proposal|quote|quotation|pricing sheet|send (?:me|us) (?:the )?(?:details|pricing|deck))\b"),
        ("meeting", r"\b(meeting|meet|catch up|sit down)\b"),
        ("call", r"\b(call|ring|phone|zoom|google meet|teams)\b"),
    ]
]  # fmt: skip
_ANY_NEXT_STEP = re.compile(
    "|".join(f"(?:{pattern.pattern})" for _, pattern in _NEXT_STEPS), re.IGNORECASE
)
_ANY_NEXT_STEP_LOWERED = _case_sensitive(_ANY_NEXT_STEP)
_WHEN = re.compile(
    r"\b(today|tomorrow|monday|tuesday|wednesday|thursday|friday|saturday|sunday|next week|"
    r"this week|(?:at )?\d{1,2}(?::\d{2})?\s*(?:am|pm)|morning|afternoon|evening)\b",
    re.IGNORECASE,
)
_SCHEDULING = re.compile(
    r"\b(schedule|book|set up|arrange|let'?s|can we|could we|happy to|free|available)\b", re.I
)


@dataclass(frozen=True, slots=True)
class NextStep:
    action: str
    when: str | None
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "when": self.when, "text": self.text}


def extract_next_step(text: str, lowered: str | None = None) -> NextStep | None:
    lowered = text.lower() if lowered is None else lowered
    if not _may_match(_ANY_NEXT_STEP, _ANY_NEXT_STEP_LOWERED, text, lowered):
        return None
    when = _WHEN.search(text)
    for action, pattern in _NEXT_STEPS:
        found = pattern.search(text)
        if found and (when or _SCHEDULING.search(text) or action in {"demo", "proposal"}):
            return NextStep(action, when.group(0) if when else None, found.group(0))
    return None


# ----------------------------------------------------------------------------- all slots

_GREETING = re.compile(
    r"^\s*(hi|hello|hey|hii+|namaste|good (?:morning|afternoon|evening)|ok|okay|thanks?|thank you)[\s!.,]*$",
    re.I,
)


@dataclass(frozen=True)
class Extracted:
    """Facts found in one message; a slot left None was not answered by it."""

    need: str | None = None
    budget: dict[str, Any] | None = None
    timeline: dict[str, Any] | None = None
    authority: dict[str, Any] | None = None
    objections: list[str] = field(default_factory=list)
    next_step: dict[str, Any] | None = None

    def slots(self) -> dict[str, Any]:
        filled: dict[str, Any] = {}
        for name in ("need", "budget", "timeline", "authority", "next_step"):
            value = getattr(self, name)
            if value is not None:
                filled[name] = value
        if self.objections:
            filled["objections"] = list(self.objections)
        return filled


_NO_OBJECTION = re.compile(r"\b(no|none|nothing|all good|no concerns|not really)\b", re.I)


def extract(text: str, now: datetime, *, expecting: str | None = None) -> Extracted:
    """Every slot a message answers. `expecting` is the slot the last question asked for:
    a free-text answer to "what problem are you solving?" is the need even without keywords."""
    # Phones and Mac mail type curly apostrophes (U+2019): "I\u2019m the CEO" or "can\u2019t
    # afford" matched none of the patterns, which spell them straight.
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    lowered = text.lower()
    budget = extract_budget(text)
    timeline = extract_timeline(text, now, lowered)
    authority = extract_authority(text, lowered)
    objections = extract_objections(text, lowered)
    next_step = extract_next_step(text, lowered)
    if timeline and next_step and next_step.when and next_step.when in timeline.text:
        # "Happy to meet next week": the date of the meeting, not of the purchase.
        timeline = None
    need = None
    stripped = text.strip()
    if expecting == "need" and stripped and not _GREETING.match(stripped):
        need = stripped[:500]
    if expecting == "objections" and not objections and _NO_OBJECTION.search(text):
        objections = ["none"]
    return Extracted(
        need=need,
        budget=budget.as_dict() if budget else None,
        timeline=timeline.as_dict() if timeline else None,
        authority=authority.as_dict() if authority else None,
        objections=objections,
        next_step=next_step.as_dict() if next_step else None,
    )
