"""The account fold after a crash: a replayed batch ends in the same balance whichever of its
changelog records (the accounts, the seen ids) were saved before the worker died."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from faust.types import TableT, TopicT
from prometheus_client import REGISTRY

from schemas.tokens import TenantStatus, TokenCredit, TokenUsage
from streams.agents.tokens import Accounts, SeenIds
from tests.fakes.topics import RecordingTopic

TENANT = "00000000-0000-4000-8000-000000000007"
USAGE_TOPIC = "acme.token-usage"


class FakeTable(dict[bytes, Any]):
    """What the fold uses of a Faust table: the mapping and its changelog hook."""

    @property
    def data(self) -> FakeTable:
        return self

    def send_changelog(self, partition: int, key: bytes, value: Any, **options: Any) -> None:
        self.changelog.append((partition, key, value))

    @property
    def changelog(self) -> list[tuple[int, bytes, Any]]:
        written: list[tuple[int, bytes, Any]] = self.__dict__.setdefault("_changelog", [])
        return written


@dataclass(frozen=True)
class Record:
    """A consumed record, as the consumer's batch lane hands it to the fold."""

    value: bytes
    offset: int
    topic: str = USAGE_TOPIC
    partition: int = 3
    key: bytes = TENANT.encode()


def accounts_over(accounts: FakeTable, seen: FakeTable) -> Accounts:
    ids = SeenIds(cast(TableT[bytes, Any], seen))
    ids.rebuild()

    async def no_pool() -> Any:
        raise AssertionError("no tenant is paused or resumed here")

    return Accounts(
        accounts=cast(TableT[bytes, Any], accounts), seen=ids,
        status_topic=cast(TopicT, RecordingTopic()), notifications=cast(TopicT, RecordingTopic()),
        dead_letters=cast(TopicT, RecordingTopic()), pool=no_pool,
    )  # fmt: skip


def batch() -> list[Record]:
    now = datetime.now(UTC)
    records: list[TokenUsage | TokenCredit] = [
        TokenCredit(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                    source="trial", reference="trial", tokens=1000),
        TokenUsage(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                   feature="qualification", tokens=5),
        TokenUsage(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                   feature="qualification", tokens=7),
    ]  # fmt: skip
    return [Record(r.model_dump_json().encode(), offset) for offset, r in enumerate(records)]


async def test_seen_ids_saved_without_the_account_the_replay_applies_the_batch() -> None:
    events = batch()
    seen = FakeTable()
    await accounts_over(FakeTable(), seen).apply(events)
    after_crash = accounts_over(FakeTable(), FakeTable(seen))  # only the ids reached Kafka
    await after_crash.apply(events)
    assert after_crash.account(TENANT).balance == 988


async def test_account_saved_without_the_seen_ids_the_replay_changes_nothing() -> None:
    events = batch()
    accounts = FakeTable()
    await accounts_over(accounts, FakeTable()).apply(events)
    after_crash = accounts_over(FakeTable(accounts), FakeTable())  # only the account did
    await after_crash.apply(events)
    assert after_crash.account(TENANT).balance == 988
    # The replay recorded the ids: the same usage produced again later is a duplicate.
    await after_crash.apply([Record(events[1].value, offset=17)])
    assert after_crash.account(TENANT).balance == 988


async def test_a_usage_produced_twice_is_applied_once() -> None:
    events = batch()
    accounts = accounts_over(FakeTable(), FakeTable())
    await accounts.apply(events)
    await accounts.apply([Record(events[2].value, offset=9)])
    assert accounts.account(TENANT).balance == 988


class UnreachableTopic(RecordingTopic):
    async def send(self, *, key: bytes, value: bytes) -> None:
        raise ConnectionError("the status topic's metadata did not come")


class AuditPool:
    async def execute(self, *args: Any) -> None:
        return None


async def test_a_flip_whose_status_was_not_sent_is_sent_by_the_replay() -> None:
    # The account was written before its status: a worker that died while the status send
    # waited came back with the flip in the account, so the replay saw no flip, and the
    # tenant stayed unpaused (spending) or paused (after paying) for good.
    accounts, seen = FakeTable(), FakeTable()
    now = datetime.now(UTC)
    credit = TokenCredit(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                         source="trial", reference="trial", tokens=5)  # fmt: skip
    spent = TokenUsage(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                       feature="qualification", tokens=5)  # fmt: skip
    await accounts_over(accounts, seen).apply([Record(credit.model_dump_json().encode(), 0)])
    usage = [Record(spent.model_dump_json().encode(), 1)]

    async def pool() -> Any:
        return AuditPool()

    def fold(status_topic: RecordingTopic) -> Accounts:
        return Accounts(
            accounts=cast(TableT[bytes, Any], accounts),
            seen=SeenIds(cast(TableT[bytes, Any], seen)), status_topic=cast(TopicT, status_topic),
            notifications=cast(TopicT, RecordingTopic()),
            dead_letters=cast(TopicT, RecordingTopic()),
            pool=pool,
        )  # fmt: skip

    with contextlib.suppress(ConnectionError):
        await fold(UnreachableTopic()).apply(usage)
    statuses = RecordingTopic()
    await fold(statuses).apply(usage)  # the worker's restart reads the batch again
    assert [TenantStatus.model_validate_json(v).paused for v in statuses.sent] == [True]
    assert (accounts[TENANT.encode()]["credited"], accounts[TENANT.encode()]["used"]) == (5, 5)


def test_ids_are_forgotten_after_the_days_kept_on_the_partitions_this_worker_is_active_for() -> (
    None
):
    # Kept for good, they took 216 MB per million token events, read back at every recovery.
    table = FakeTable()
    table[b"legacy"] = {"id-legacy": "acme.token-usage:3:1"}  # before batches had a time
    ids = SeenIds(cast(TableT[bytes, Any], table), kept_s=7 * 86_400)
    ids.rebuild()
    day = 86_400.0
    ids.add({3: {"id-old": "acme.token-usage:3:2"}, 5: {"id-standby": "acme.token-usage:5:2"}},
            now_s=100 * day)  # fmt: skip
    ids.add({3: {"id-new": "acme.token-usage:3:9"}}, now_s=106 * day)
    # Only the legacy record (no time, no partition) is a week old.
    assert ids.prune(owned={3}, held={3, 5}, now_s=106 * day) == 1
    assert ids.prune(owned={3}, held={3, 5}, now_s=108 * day) == 1
    assert "id-old" not in ids
    assert "id-legacy" not in ids
    assert "id-new" in ids
    assert "id-standby" in ids  # partition 5's active worker deletes its own
    deleted = [(partition, value) for partition, _, value in table.changelog if value is None]
    assert deleted == [(3, None)]
    # What is left in the table is what a recovery reads back.
    again = SeenIds(cast(TableT[bytes, Any], table))
    again.rebuild()
    assert "id-old" not in again
    assert "id-new" in again
    assert "id-standby" in again


def test_a_recovery_republishes_the_gauges_of_the_accounts_this_worker_is_active_for() -> None:
    # Set only when a token event came: a restarted worker exported nothing for a quiet
    # paused tenant (its alert resolved while it stayed paused).
    paused, moved = str(uuid.uuid4()), str(uuid.uuid4())
    accounts = FakeTable()
    accounts[paused.encode()] = {"credited": 10, "used": 10, "cycle_base": 10, "cycle_used": 10,
                                 "alerted": [100], "cycles": 1}  # fmt: skip
    accounts[moved.encode()] = {"credited": 50, "used": 0, "cycle_base": 50, "cycle_used": 0,
                                "alerted": [], "cycles": 1}  # fmt: skip
    fold = accounts_over(accounts, FakeTable())
    fold.republish_gauges(lambda key: key != moved.encode())
    assert REGISTRY.get_sample_value("flexoraa_token_tenant_paused", {"tenant_id": paused}) == 1
    assert REGISTRY.get_sample_value("flexoraa_token_balance", {"tenant_id": moved}) is None


def test_the_ids_of_a_partition_no_longer_held_are_forgotten_without_a_tombstone() -> None:
    # Faust's store keeps keys written with an explicit partition after the partition moved:
    # a long-lived worker held every id it ever wrote for partitions it had lost.
    table = FakeTable()
    ids = SeenIds(cast(TableT[bytes, Any], table), kept_s=7 * 86_400)
    ids.add({4: {"id-moved": "acme.token-usage:4:1"}}, now_s=100.0)
    assert ids.prune(owned={3}, held={3}, now_s=101.0) == 1
    assert "id-moved" not in ids
    assert dict(table) == {}
    assert [value for _, _, value in table.changelog if value is None] == []


async def test_a_status_the_topic_holds_wrongly_is_corrected_without_a_flip() -> None:
    # Killed after a flip's status ("paused") and before its account, then replaying a batch
    # with the top-up after it: the account never flipped, no status went out, and the
    # tenant stayed paused with tokens for good.
    accounts, seen = FakeTable(), FakeTable()
    now = datetime.now(UTC)
    credit = TokenCredit(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                         source="trial", reference="trial", tokens=10)  # fmt: skip
    await accounts_over(accounts, seen).apply([Record(credit.model_dump_json().encode(), 0)])
    topped_up = TokenCredit(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                            source="purchase", reference="order_1", tokens=100)  # fmt: skip
    on_topic = {TENANT: TenantStatus(tenant_id=TENANT, balance=0, paused=True, updated_at=now)}

    def fold(statuses: RecordingTopic) -> Accounts:
        return Accounts(
            accounts=cast(TableT[bytes, Any], accounts),
            seen=SeenIds(cast(TableT[bytes, Any], seen)), status_topic=cast(TopicT, statuses),
            notifications=cast(TopicT, RecordingTopic()),
            dead_letters=cast(TopicT, RecordingTopic()), pool=cast(Any, None),
            published=on_topic.get,
        )  # fmt: skip

    statuses = RecordingTopic()
    await fold(statuses).apply([Record(topped_up.model_dump_json().encode(), 1)])
    assert [TenantStatus.model_validate_json(v).paused for v in statuses.sent] == [False]
    # The topic agreeing, a busy tenant's batches send nothing.
    on_topic[TENANT] = TenantStatus.model_validate_json(statuses.sent[0])
    again = TokenCredit(event_id=str(uuid.uuid4()), tenant_id=TENANT, occurred_at=now,
                        source="purchase", reference="order_2", tokens=100)  # fmt: skip
    quiet = RecordingTopic()
    await fold(quiet).apply([Record(again.model_dump_json().encode(), 2)])
    assert quiet.sent == []
