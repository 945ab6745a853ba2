"""The account fold after a crash: a replayed batch ends in the same balance whichever of its
changelog records (the accounts, the seen ids) were saved before the worker died."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from faust.types import TableT, TopicT

from schemas.tokens import TenantStatus, TokenCredit, TokenUsage
from streams.agents.tokens import Accounts, SeenIds

TENANT = "00000000-0000-4000-8000-000000000007"
USAGE_TOPIC = "acme.token-usage"


class FakeTable(dict[bytes, Any]):
    """What the fold uses of a Faust table: the mapping and its changelog hook."""

    @property
    def data(self) -> FakeTable:
        return self

    def send_changelog(self, partition: int, key: bytes, value: Any) -> None:
        pass


class FakeTopic:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append(value)


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
        status_topic=cast(TopicT, FakeTopic()), notifications=cast(TopicT, FakeTopic()),
        dead_letters=cast(TopicT, FakeTopic()), pool=no_pool,
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


class UnreachableTopic(FakeTopic):
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

    def fold(status_topic: FakeTopic) -> Accounts:
        return Accounts(
            accounts=cast(TableT[bytes, Any], accounts),
            seen=SeenIds(cast(TableT[bytes, Any], seen)), status_topic=cast(TopicT, status_topic),
            notifications=cast(TopicT, FakeTopic()), dead_letters=cast(TopicT, FakeTopic()),
            pool=pool,
        )  # fmt: skip

    with contextlib.suppress(ConnectionError):
        await fold(UnreachableTopic()).apply(usage)
    statuses = FakeTopic()
    await fold(statuses).apply(usage)  # the worker's restart reads the batch again
    assert [TenantStatus.model_validate_json(v).paused for v in statuses.sent] == [True]
    assert (accounts[TENANT.encode()]["credited"], accounts[TENANT.encode()]["used"]) == (5, 5)
