"""What `flexoraa dead-letters` takes and leaves: its filters, its times, and the letters it
will not put back."""

from __future__ import annotations

import argparse
import base64
from datetime import UTC, datetime, timedelta

import pytest

from flexoraa.cli import _moment, build_parser, cmd_dead_letters_replay
from flexoraa.dead_letters import LetterFilter, StoredLetter, replay, skip_reason
from flexoraa.settings import Settings
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
    ("dead", "to_all_readers", "why"),
    [
        (letter(), False, None),
        (letter(source_topic=NAMES.deadlines), False, f"not replayable: {NAMES.deadlines}"),
        (letter(source_topic=NAMES.changelog("sessions")), False,
         f"not replayable: {NAMES.changelog('sessions')}"),
        (letter(source_topic=NAMES.tenant_status), False,
         f"not replayable: {NAMES.tenant_status}"),
        (letter(kind="wrong_key"), False, "refused for its key"),
        (letter(raw_base64="not base64!"), False, "raw bytes not base64"),
        # An older worker's letters name no handler: an undecodable record was taken by no
        # reader, anything else by all but one.
        (letter(kind=None, consumer=None, reason="invalid event: text: Field required"), False,
         None),
        (letter(kind=None, consumer=None), False,
         "handler not named (an older worker's letter; --to-all-readers)"),
        (letter(kind=None, consumer=None), True, None),
        (letter(kind=None, consumer=None, reason="record key is not the event's lead_id"), True,
         "refused for its key"),
    ],
)  # fmt: skip
def test_what_a_replay_leaves(dead: DeadLetter, to_all_readers: bool, why: str | None) -> None:
    assert skip_reason(dead, NAMES, to_all_readers=to_all_readers) == why


async def test_copies_of_a_record_are_one_replay_and_a_marked_one_makes_them_all_replayed() -> None:
    # Set aside twice (a restart before the commit), replayed once; a later replay found the
    # unmarked copy and put the record back again.
    settings = Settings(topic_prefix="acme")
    first, copy = letter(), letter(dead_lettered_at=AT + timedelta(seconds=5))
    other = letter(raw_base64=base64.b64encode(b'{"other": 1}').decode())
    fresh = [StoredLetter(0, 1, first), StoredLetter(0, 2, copy), StoredLetter(0, 3, other)]
    report = await replay(settings, fresh, dry_run=True)
    assert report.replayed == {NAMES.inbound_messages: 2}
    assert report.skipped == {"same record as another letter": 1}

    replayed_at = AT + timedelta(hours=1)
    marked = [StoredLetter(0, 1, first, replayed_at=replayed_at), StoredLetter(0, 2, copy)]
    report = await replay(settings, marked, dry_run=True)
    assert report.replayed == {}
    assert report.skipped == {"replayed before": 2}
    report = await replay(settings, marked, dry_run=True, again=True)
    assert report.replayed == {NAMES.inbound_messages: 1}


async def test_a_record_set_aside_again_after_its_replay_goes_back() -> None:
    # Replayed before the fix reached every worker, it failed again: a new letter of the same
    # record and handler, to put back once mended, without --again (which takes every letter).
    settings = Settings(topic_prefix="acme")
    replayed_at = AT + timedelta(hours=1)
    again = letter(dead_lettered_at=replayed_at + timedelta(seconds=1))
    copies = [StoredLetter(0, 1, letter(), replayed_at=replayed_at), StoredLetter(0, 7, again)]
    report = await replay(settings, copies, dry_run=True)
    assert report.replayed == {NAMES.inbound_messages: 1}
    assert report.skipped == {"same record as another letter": 1}


async def test_a_record_two_handlers_set_aside_goes_back_to_each() -> None:
    settings = Settings(topic_prefix="acme")
    both = [StoredLetter(0, 1, letter(consumer="qualification")),
            StoredLetter(0, 2, letter(consumer="recovery-watch"))]  # fmt: skip
    report = await replay(settings, both, dry_run=True)
    assert report.replayed == {NAMES.inbound_messages: 2}
    assert report.skipped == {}
