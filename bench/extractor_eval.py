"""Precision and recall per slot of the built-in extractor on the labelled utterances.

    .venv/bin/python -m bench.extractor_eval          (or: make eval-extractor)

A slot counts as predicted when the extractor fills it, as labelled when the set gives it a
value; a prediction is correct when it matches the label (budget: same currency and bounds
within 1 %; timeline: within 7 days or 25 %; authority: same decision-maker flag; objections:
per category; next step: same action). Utterances without a label for a slot expect nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flexoraa.settings import PROJECT_ROOT
from streams.rules.extraction import extract

UTTERANCES = PROJECT_ROOT / "tests" / "data" / "qualification_utterances.jsonl"
# Timelines such as "Q3" or "by March" are relative to the day the set was labelled.
LABELLED_ON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@dataclass
class Score:
    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0

    @property
    def precision(self) -> float:
        predicted = self.true_positive + self.false_positive
        return self.true_positive / predicted if predicted else 1.0

    @property
    def recall(self) -> float:
        labelled = self.true_positive + self.false_negative
        return self.true_positive / labelled if labelled else 1.0


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 0.01 * max(abs(a), abs(b))


def _budget_ok(predicted: dict[str, Any], label: dict[str, Any]) -> bool:
    return (
        predicted["currency"] == label["currency"]
        and _close(predicted["min"], label["min"])
        and _close(predicted["max"], label["max"])
    )


def _timeline_ok(predicted: dict[str, Any], label: int | None) -> bool:
    days = predicted["days"]
    if label is None or days is None:
        return days is None and label is None
    return bool(abs(days - label) <= max(7, 0.25 * label))


def evaluate(path: Path = UTTERANCES) -> dict[str, Score]:
    scores = {
        slot: Score() for slot in ("budget", "timeline", "authority", "objections", "next_step")
    }
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        found = extract(case["text"], LABELLED_ON)

        def tally(slot: str, predicted: Any, labelled: bool, correct: bool) -> None:
            score = scores[slot]
            if predicted is not None and labelled and correct:
                score.true_positive += 1
            else:
                if predicted is not None:
                    score.false_positive += 1
                if labelled:
                    score.false_negative += 1

        budget = case.get("budget")
        tally(
            "budget",
            found.budget,
            budget is not None,
            budget is not None and found.budget is not None and _budget_ok(found.budget, budget),
        )
        has_timeline = "timeline_days" in case and (
            case["timeline_days"] is not None or case.get("timeline_present", False)
        )
        tally(
            "timeline",
            found.timeline,
            has_timeline,
            has_timeline
            and found.timeline is not None
            and _timeline_ok(found.timeline, case["timeline_days"]),
        )
        authority = case.get("authority")
        tally(
            "authority",
            found.authority,
            authority is not None,
            found.authority is not None and found.authority["decision_maker"] is authority,
        )
        step = case.get("next_step")
        tally(
            "next_step",
            found.next_step,
            step is not None,
            found.next_step is not None and found.next_step["action"] == step,
        )
        labelled_objections = set(case.get("objections", []))
        predicted_objections = set(found.objections)
        objections = scores["objections"]
        objections.true_positive += len(predicted_objections & labelled_objections)
        objections.false_positive += len(predicted_objections - labelled_objections)
        objections.false_negative += len(labelled_objections - predicted_objections)
    return scores


def main() -> int:
    scores = evaluate()
    count = sum(1 for line in UTTERANCES.read_text().splitlines() if line.strip())
    print(f"built-in extractor on {count} labelled utterances ({UTTERANCES.name})")
    print(f"{'slot':<12} {'precision':>9} {'recall':>7} {'tp':>4} {'fp':>4} {'fn':>4}")
    for slot, score in scores.items():
        print(
            f"{slot:<12} {score.precision:>9.2f} {score.recall:>7.2f} "
            f"{score.true_positive:>4} {score.false_positive:>4} {score.false_negative:>4}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
