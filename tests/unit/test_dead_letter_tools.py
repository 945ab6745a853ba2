"""What `flexoraa dead-letters` takes and leaves: its filters, its times, and the letters it
will not put back."""

from __future__ import annotations

import argparse
import base64
from datetime import UTC, datetime, timedelta

import pytest

from flexoraa.cli import _moment, build_parser, cmd_dead_letters_replay
from flexoraa.dead_letters import LetterFilter, StoredLetter, skip_reason
from schemas.events import DeadLetter
from schemas.topics import TopicNames

NAMES = TopicNames("acme")
LEAD = "5d1b8a52-3c4e-4f0a-9b7d-2e6f8c1a0b93"
AT = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def letter(**fields: object) -> DeadLetter:
    values: dict[str, object] = {
        "source_topic": NAMES.inbound_messages, "partition": 3, "offset": 9,
        "reason": "processing failed: DataError: invalid input for query argument $1",
        "raw_base64": base64.b64encode(b"{}").decode(),
        "key_base64": base64.b64encode(LEAD.encode()).decode(),
        "dead_lettered_at": AT, "kind": "processing_failed", "consumer": "qualification",
    }  # fmt: skip
    return DeadLetter.model_validate(values | fields)


@pytest.mark.parametrize(
    ("letter_filter", "matches"),
    [
        (LetterFilter(), True),
        (LetterFilter(since=AT), True),
        (LetterFilter(since=AT + timedelta(seconds=1)), False),
        (LetterFilter(until=AT), False),  # until is exclusive
        (LetterFilter(until=AT + timedelta(seconds=1)), True),
        (LetterFilter(reason="dataerror"), True),
        (LetterFilter(reason="unknown tenant"), False),
        (LetterFilter(source="inbound-messages"), True),
        (LetterFilter(source="acme.inbound-messages"), True),
        (LetterFilter(source="messages"), False),
        (LetterFilter(key=LEAD), True),
        (LetterFilter(key=LEAD[:8]), False),
        (LetterFilter(reason="DataError", source="inbound-messages", key=LEAD), True),
    ],
)
def test_a_letter_is_taken_when_every_given_condition_holds(
    letter_filter: LetterFilter, matches: bool
) -> None:
    assert letter_filter.matches(letter(), NAMES) is matches


def test_empty_conditions_are_no_filter() -> None:
    # `--reason ""` matched every letter while passing for a filter: a replay of all of them.
    assert LetterFilter(reason="", key="").is_empty()
    assert not LetterFilter(key=LEAD).is_empty()


def test_replay_refuses_to_run_without_a_filter_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["dead-letters", "replay", "--reason", ""])
    assert cmd_dead_letters_replay(args) == 2
    assert "--all" in capsys.readouterr().err


def test_times_are_iso_or_ago() -> None:
    assert _moment("2026-12-04T12:00:00") == AT  # UTC unless it says otherwise
    assert _moment("2026-12-04T13:00:00+01:00") == AT
    now = datetime.now(UTC)
    assert abs((now - _moment("2h")) - timedelta(hours=2)) < timedelta(seconds=5)
    assert abs((now - _moment("7d")) - timedelta(days=7)) < timedelta(seconds=5)
    with pytest.raises(argparse.ArgumentTypeError):
        _moment("yesterday")


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused(limit: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dead-letters", "list", "--limit", limit])


@pytest.mark.parametrize(
    ("stored", "again", "why"),
    [
        (StoredLetter(0, 1, letter()), False, None),
        (StoredLetter(0, 1, letter(source_topic=NAMES.deadlines)), False,
         f"not replayable: {NAMES.deadlines}"),
        (StoredLetter(0, 1, letter(source_topic=NAMES.changelog("sessions"))), False,
         f"not replayable: {NAMES.changelog('sessions')}"),
        (StoredLetter(0, 1, letter(source_topic=NAMES.tenant_status)), False,
         f"not replayable: {NAMES.tenant_status}"),
        (StoredLetter(0, 1, letter(kind="wrong_key")), False, "refused for its key"),
        (StoredLetter(0, 1, letter(), replayed_at=AT), False, "replayed before"),
        (StoredLetter(0, 1, letter(), replayed_at=AT), True, None),
        (StoredLetter(0, 1, letter(raw_base64="not base64!")), False, "raw bytes not base64"),
    ],
)  # fmt: skip
def test_what_a_replay_leaves(stored: StoredLetter, again: bool, why: str | None) -> None:
    assert skip_reason(stored, NAMES, again=again) == why
