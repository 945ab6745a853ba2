"""`flexoraa dead-letters list|replay` on the real broker: the filters, the records put back
under their keys on their partitions, internal topics left alone, and a replay that must be
asked for."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from flexoraa import dead_letters
from flexoraa.kafka import partition_of
from flexoraa.settings import Settings
from schemas.events import REPLAY_FOR_HEADER, DeadLetter
from schemas.messaging import LeadEvent, OutboundCommand
from schemas.topics import TopicNames
from tests.conftest import MakeTenant
from tests.integration.conftest import flexoraa, read_records, send_records
from tests.integration.test_notifications import admin_alert

pytestmark = pytest.mark.integration


def letter(
    source_topic: str, key: str, raw: bytes, reason: str, age: timedelta,
    kind: str = "processing_failed", consumer: str | None = None,
) -> bytes:  # fmt: skip
    return DeadLetter(
        source_topic=source_topic, partition=0, offset=0, reason=reason,
        raw_base64=base64.b64encode(raw).decode(),
        key_base64=base64.b64encode(key.encode()).decode(),
        dead_lettered_at=datetime.now(UTC) - age, kind=kind, consumer=consumer,
    ).model_dump_json().encode()  # fmt: skip


def listed(settings: Settings, *filters: str) -> list[dict[str, object]]:
    done = flexoraa(settings, "dead-letters", "list", "--json", *filters)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def test_letters_are_listed_by_filter_and_replayed_onto_their_keys_partition(
    test_settings: Settings,
) -> None:
    names = TopicNames(test_settings.topic_prefix)
    lead = str(uuid.uuid4())
    # Valid events (other tests read these topics whole) of a tenant that does not exist: the
    # sink refuses their rows again, which is all they do.
    tenant = str(uuid.uuid4())
    lead_event, again_event = (
        LeadEvent(event_id=str(uuid.uuid4()), tenant_id=tenant, occurred_at=datetime.now(UTC),
                  lead_id=lead, type="recovery_replied", data={"step": step}
                  ).model_dump_json().encode()
        for step in (1, 2)
    )  # fmt: skip
    await send_records(test_settings, names.dead_letters, [
        (lead.encode(), letter(names.lead_events, lead, lead_event,
                               "row not writable: KeyError: 'turn'", timedelta(days=2))),
        (lead.encode(), letter(names.deadlines, lead, b"{}",
                               "processing failed: DataError: invalid UUID", timedelta(0))),
        (lead.encode(), letter(names.lead_events, lead, again_event,
                               "row not writable: ValueError: bad", timedelta(0),
                               consumer="sink-lead-events")),
    ])  # fmt: skip

    assert len(listed(test_settings, "--key", lead)) == 3
    assert [entry["reason"] for entry in listed(test_settings, "--key", lead, "--since", "1d")] == [
        "processing failed: DataError: invalid UUID",
        "row not writable: ValueError: bad",
    ]
    only_rows = listed(test_settings, "--key", lead, "--reason", "ROW NOT WRITABLE")
    assert [entry["source_topic"] for entry in only_rows] == [names.lead_events] * 2
    assert len(listed(test_settings, "--key", lead, "--source", "deadlines")) == 1
    assert listed(test_settings, "--key", str(uuid.uuid4())) == []

    refused = flexoraa(test_settings, "dead-letters", "replay")
    assert refused.returncode == 2
    assert "--all" in refused.stderr

    dry = flexoraa(test_settings, "dead-letters", "replay", "--key", lead, "--dry-run")
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "replayed": {names.lead_events: 2},
        "skipped": {f"not replayable: {names.deadlines}": 1},
        "unmarked": 0,
    }
    replayed_before = [r for r in await read_records(test_settings, [names.lead_events])
                       if r.key == lead.encode()]  # fmt: skip
    assert replayed_before == []

    done = flexoraa(test_settings, "dead-letters", "replay", "--key", lead)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replayed"] == {names.lead_events: 2}
    put_back = [r for r in await read_records(test_settings, [names.lead_events])
                if r.key == lead.encode()]  # fmt: skip
    assert [r.value for r in put_back] == [lead_event, again_event]
    assert {r.partition for r in put_back} == {
        partition_of(lead.encode(), test_settings.kafka_partitions)
    }
    # The sink's letter is for the sink alone: the topic's other readers took the record.
    assert [list(r.headers) for r in put_back] == [[], [(REPLAY_FOR_HEADER, b"sink-lead-events")]]

    # Each letter is replayed once, unless asked again.
    assert all(entry["replayed_at"] for entry in listed(test_settings, "--source", "lead-events",
                                                        "--key", lead))  # fmt: skip
    twice = flexoraa(test_settings, "dead-letters", "replay", "--key", lead)
    assert json.loads(twice.stdout)["skipped"] == {
        "replayed before": 2,
        f"not replayable: {names.deadlines}": 1,
    }
    again = flexoraa(test_settings, "dead-letters", "replay", "--key", lead, "--again")
    assert json.loads(again.stdout)["replayed"] == {names.lead_events: 2}


async def test_a_limit_lists_the_oldest_letters_across_partitions(
    test_settings: Settings,
) -> None:
    names = TopicNames(test_settings.topic_prefix)
    # From now on (the letters' produce time, and when they say they were set aside: ahead):
    # only this test's letters, each partition's in the order they were set aside.
    token, since = uuid.uuid4().hex, datetime.now(UTC)
    # Leads on two partitions; the oldest letters are on the one produced to last.
    first, second = (str(uuid.uuid4()) for _ in range(2))
    while partition_of(second.encode(), test_settings.kafka_partitions) == partition_of(
        first.encode(), test_settings.kafka_partitions
    ):
        second = str(uuid.uuid4())
    ahead = {first: (30, 31, 32), second: (10, 11, 12)}  # minutes
    for lead, minutes in ahead.items():
        await send_records(test_settings, names.dead_letters, [
            (lead.encode(), letter(names.deadlines, lead, b"{}",
                                   f"processing failed: {token} {at}", -timedelta(minutes=at)))
            for at in minutes
        ])  # fmt: skip

    filters = ("--reason", token, "--since", since.isoformat())
    oldest = listed(test_settings, *filters, "--limit", "4")
    assert [entry["reason"] for entry in oldest] == [
        f"processing failed: {token} {at}" for at in (10, 11, 12, 30)
    ]
    assert len(listed(test_settings, *filters)) == 6


async def test_a_limit_reads_each_partition_only_until_it_is_past_the_oldest_found(
    test_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = TopicNames(test_settings.topic_prefix)
    # From now on (the letters' produce time, and when they say they were set aside: ahead,
    # minutes apart): only this test's letters are read.
    token, since = uuid.uuid4().hex, datetime.now(UTC)
    leads = [str(uuid.uuid4())]
    while len({partition_of(lead.encode(), test_settings.kafka_partitions) for lead in leads}) < 2:
        leads.append(str(uuid.uuid4()))
    leads = [leads[0], leads[-1]]  # on two partitions
    for index, lead in enumerate(leads):
        await send_records(test_settings, names.dead_letters, [
            (lead.encode(), letter(names.deadlines, lead, b"{}", f"processing failed: {token}",
                                   -timedelta(minutes=ahead, seconds=index)))
            for ahead in (0, 10, 20)
        ])  # fmt: skip
    decoded = 0

    class Counted(DeadLetter):
        @classmethod
        def model_validate_json(cls, *args: Any, **kwargs: Any) -> Any:
            nonlocal decoded
            decoded += 1
            return DeadLetter.model_validate_json(*args, **kwargs)

    monkeypatch.setattr(dead_letters, "DeadLetter", Counted)
    letter_filter = dead_letters.LetterFilter(since=since, reason=token)
    (oldest,) = await dead_letters.read_letters(test_settings, letter_filter, limit=1)
    assert dead_letters.key_text(oldest.letter) == leads[0]  # its letter 0 minutes ahead
    # Each partition read to its letter 10 minutes on (past the oldest by over
    # SET_ASIDE_SKEW), not to the one 20 minutes on.
    assert decoded == 4
    assert len(await dead_letters.read_letters(test_settings, letter_filter)) == 6


async def test_a_record_refused_for_its_key_and_copies_of_one_record_are_not_replayed_twice(
    test_settings: Settings,
) -> None:
    names = TopicNames(test_settings.topic_prefix)
    lead = str(uuid.uuid4())
    record = admin_alert(str(uuid.uuid4()), "the same record", "twice").model_dump_json().encode()
    same = letter(names.notifications, lead, record, "unknown tenant", timedelta(0))
    await send_records(test_settings, names.dead_letters, [
        (lead.encode(), same), (lead.encode(), same),
        (lead.encode(), letter(names.inbound_messages, lead, b"{}", "record key is not the "
                               "event's lead_id", timedelta(0), kind="wrong_key")),
    ])  # fmt: skip
    dry = flexoraa(test_settings, "dead-letters", "replay", "--key", lead, "--dry-run")
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "replayed": {names.notifications: 1},
        "skipped": {"same record as another letter": 1, "refused for its key": 1},
        "unmarked": 0,
    }
    done = flexoraa(test_settings, "dead-letters", "replay", "--key", lead)
    assert json.loads(done.stdout)["replayed"] == {names.notifications: 1}
    # Both copies marked: the next replay takes neither.
    copies = listed(test_settings, "--key", lead, "--source", "notifications")
    assert len(copies) == 2
    assert all(entry["replayed_at"] for entry in copies)
    assert json.loads(flexoraa(test_settings, "dead-letters", "replay", "--key", lead).stdout)[
        "skipped"
    ] == {"replayed before": 2, "refused for its key": 1}


async def test_a_scheduled_message_cancelled_since_its_letter_is_not_put_back(
    test_settings: Settings, make_tenant: MakeTenant, db: asyncpg.Connection
) -> None:
    # The worker remembers a cancel among a lead's last 64 command ids only: a letter replayed
    # days later, after a busy lead's newer commands, would go out. PostgreSQL's status holds.
    names = TopicNames(test_settings.topic_prefix)
    tenant = await make_tenant()
    lead = str(uuid.uuid4())
    send_at = datetime.now(UTC) + timedelta(hours=1)
    cancelled, kept = (
        OutboundCommand(event_id=str(uuid.uuid4()), tenant_id=tenant.tenant_id,
                        occurred_at=datetime.now(UTC), lead_id=lead, text=text, send_at=send_at)
        for text in ("Never mind", "See you at five")
    )  # fmt: skip
    for command, status in ((cancelled, "cancelled"), (kept, "scheduled")):
        await db.execute(
            "INSERT INTO scheduled_messages (scheduled_id, tenant_id, lead_id, body, send_at,"
            " status) VALUES ($1, $2, $3, $4, $5, $6)",
            command.event_id, tenant.tenant_id, lead, command.text, send_at, status,
        )  # fmt: skip
    await send_records(test_settings, names.dead_letters, [
        (lead.encode(), letter(names.outbound_commands, lead, c.model_dump_json().encode(),
                               "processing failed: KeyError: 'channel'", timedelta(0)))
        for c in (cancelled, kept)
    ])  # fmt: skip
    dry = flexoraa(test_settings, "dead-letters", "replay", "--key", lead, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "replayed": {names.outbound_commands: 1},
        "skipped": {"a scheduled message cancelled since": 1},
        "unmarked": 0,
    }


async def test_a_letter_older_than_the_token_dedup_is_put_back_only_when_asked(
    test_settings: Settings,
) -> None:
    # Replayed after the workers forgot its usage's id (7 days; letters are kept 30), an
    # inbound message whose qualification step charged before it failed was charged again.
    names = TopicNames(test_settings.topic_prefix)
    lead = str(uuid.uuid4())
    await send_records(test_settings, names.dead_letters, [
        (lead.encode(), letter(names.inbound_messages, lead, b'{"old": 1}', "processing failed",
                               timedelta(days=10), consumer="qualification")),
        (lead.encode(), letter(names.inbound_messages, lead, b'{"new": 1}', "processing failed",
                               timedelta(days=1), consumer="qualification")),
    ])  # fmt: skip
    dry = flexoraa(test_settings, "dead-letters", "replay", "--key", lead, "--dry-run")
    assert json.loads(dry.stdout)["replayed"] == {names.inbound_messages: 1}
    assert json.loads(dry.stdout)["skipped"] == {
        "older than TOKEN_SEEN_KEPT_DAYS: tokens could be charged or credited twice "
        "(--past-token-dedup)": 1
    }
    asked = flexoraa(test_settings, "dead-letters", "replay", "--key", lead, "--dry-run",
                     "--past-token-dedup")  # fmt: skip
    assert json.loads(asked.stdout)["replayed"] == {names.inbound_messages: 2}
