"""Token accounts, the tenant status every worker reads, the AI gate and the credit relay.

* `Accounts` folds usage, credit and debit events (keyed by tenant; whole fetches of the token
  topics, through the consumer's batch lane) into the `token_accounts` table, counting each event id
  once (the `token_seen` table), alerts at the thresholds and publishes each changed account's
  balance and paused flag to the compacted tenant-status topic.
* `TenantStatusView` reads that whole topic on every worker (the lead-keyed agents need the
  status of any tenant), like a global table but with a plain consumer, so it never joins a
  consumer-group rebalance.
* `AiGate` is asked before every AI action. A paused tenant's action is kept (in the
  `deferred_ai` table, keyed by lead) and an "ai_resume" deadline is set; when the tenant has
  tokens again the worker owning the lead fires that deadline at once and the action runs.
* The outbox relay publishes credits and debits committed in PostgreSQL (flexoraa.credits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.types import AppT, TableT, TopicT
from pydantic import Field, TypeAdapter, ValidationError

from flexoraa import audit
from flexoraa.credits import credit_due_subscriptions, relay_pending
from flexoraa.db import DB_ERRORS, while_unreachable
from flexoraa.kafka import back_off_failed_metadata_updates, partition_of
from schemas.ids import name_based_id
from schemas.messaging import DeadlineReached
from schemas.notifications import Notification
from schemas.tokens import (
    MAX_TOKENS_PER_EVENT,
    BalanceChange,
    Feature,
    TenantStatus,
    TokenCredit,
    TokenDebit,
    TokenEvent,
    TokenUsage,
)
from streams.agents.deadlines import (
    DeadLettered,
    DeadlineHandler,
    Evidence,
    deadline_event_id,
)
from streams.batches import BatchLane, SourceRecord
from streams.dead_letters import dead_letter_record, describe_validation_error
from streams.locks import KeyLocks
from streams.metrics import (
    AI_ACTIONS_DEFERRED,
    TOKEN_BALANCE,
    TOKEN_CYCLE_USED_PERCENT,
    TOKEN_EVENTS,
    TOKEN_TENANT_PAUSED,
)
from streams.poison import is_poison
from streams.producer import delete_in_partition, put_in_partition
from streams.rules.tokens import Account, charge, credit, debit, spend
from streams.timers import Scheduler

logger = logging.getLogger(__name__)

# By its `kind`: a plain union tries both models on every record (twice the decoding time).
_TOKEN_EVENT: TypeAdapter[TokenEvent] = TypeAdapter(
    Annotated[TokenEvent, Field(discriminator="kind")]
)
PoolFactory = Callable[[], Awaitable[asyncpg.Pool]]
_ALERT_NAMESPACE = uuid.UUID("b0d8f3e2-6a41-4f7c-9b25-1c3e5d7f9a0b")
RESUME_DEADLINE = "ai_resume"
# A deferred action is re-checked at least this often even if no status change is seen.
_RESUME_RECHECK_MS = 3_600_000


def _gauge_account(tenant_id: str, account: Account) -> None:
    TOKEN_BALANCE.labels(tenant_id).set(account.balance)
    TOKEN_CYCLE_USED_PERCENT.labels(tenant_id).set(account.cycle_percent)
    TOKEN_TENANT_PAUSED.labels(tenant_id).set(1 if account.paused else 0)


class SeenIds:
    """The event ids already applied, each with the record it was applied from, kept in a table
    as one record per partition and batch (a record per event would double the changelog
    traffic) and in memory for lookups.

    Kept `kept_s`: a replay is recognised by its offset (the account's `applied_up_to`); the
    ids catch an event published again at a new offset (an outbox row relayed twice, an effect
    re-sent after a crash), which happens within minutes. Kept for good, they took about 216 MB
    of memory per million token events and were all read back at every recovery.
    """

    def __init__(self, table: TableT[bytes, Any], kept_s: float = 7 * 86_400) -> None:
        self.table = table
        self.kept_s = kept_s
        self._ids: dict[str, str | None] = {}
        # Each batch record of the partitions held: (partition, written at (unix s), its ids).
        self._batches: dict[bytes, tuple[int | None, float, list[str]]] = {}

    def rebuild(self) -> None:
        """After every recovery: the ids of the partitions this worker now holds."""
        self._ids = {}
        self._batches = {}
        for key, value in self.table.items():
            if isinstance(value, dict) and "positions" in value:
                positions = value["positions"]
                batch = (value["partition"], value["at"], list(positions))
            else:
                # Written before batches carried their time: a dict of positions, or a list
                # of ids without one. Dropped by the first prune.
                positions = value if isinstance(value, dict) else dict.fromkeys(value)
                batch = (None, 0.0, list(positions))
            self._ids.update(positions)
            self._batches[key] = batch

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def position_of(self, event_id: str) -> str | None:
        """Where the id was first applied from ("topic:partition:offset"), if known."""
        return self._ids.get(event_id)

    def add(self, by_partition: dict[int, dict[str, str]], now_s: float | None = None) -> None:
        at = time.time() if now_s is None else now_s
        for partition, positions in by_partition.items():
            key = uuid.uuid4().bytes
            record = {"partition": partition, "at": at, "positions": positions}
            put_in_partition(self.table, partition, key, record)
            self._ids.update(positions)
            self._batches[key] = (partition, at, list(positions))

    def prune(self, owned: set[int], held: set[int], now_s: float | None = None) -> int:
        """Forgets the batches older than `kept_s` of the partitions this worker is active for
        (`owned`: a tombstone each; a standby's are its active's to delete), and every batch
        of a partition it no longer holds at all (`held`: actives and standbys; Faust's store
        keeps keys written with an explicit partition after that partition moved). Returns
        how many ids were forgotten."""
        cutoff = (time.time() if now_s is None else now_s) - self.kept_s
        key_partitions = getattr(self.table.data, "_key_partition", {})
        forgotten = 0
        for key, (partition, at, ids) in list(self._batches.items()):
            if partition is None:
                # Written before records named their partition: the store's, when it read it.
                partition = key_partitions.get(key)
            if partition is not None and partition not in held:
                self.table.data.pop(key, None)  # no longer this worker's: no tombstone
            elif at >= cutoff:
                continue
            elif partition is None:
                pass  # its partition unknown: forgotten here only, read again at a recovery
            elif partition in owned:
                delete_in_partition(self.table, partition, key)
            else:
                continue  # a standby's: its active worker deletes it
            del self._batches[key]
            for event_id in ids:
                self._ids.pop(event_id, None)
            forgotten += len(ids)
        return forgotten


class Accounts:
    """Folds batches of token events into the account table (pure rule: streams.rules.tokens)."""

    def __init__(
        self,
        *,
        accounts: TableT[bytes, Any],
        seen: SeenIds,
        status_topic: TopicT,
        notifications: TopicT,
        dead_letters: TopicT,
        pool: PoolFactory,
        published: Callable[[str], TenantStatus | None] = lambda tenant_id: None,
    ) -> None:
        # The status the tenant-status topic holds for a tenant (the workers' view of it).
        self._published = published
        self._pool = pool
        self._accounts = accounts
        self._seen = seen
        self._status_topic = status_topic
        self._notifications = notifications
        self._dead_letters = dead_letters

    @property
    def table(self) -> TableT[bytes, Any]:
        return self._accounts

    def account(self, tenant_id: str) -> Account:
        return Account.from_dict(self._accounts.get(tenant_id.encode()))

    def _applied_up_to(self, tenant_id: str) -> dict[str, int]:
        """The last offset applied to the tenant's account, per topic and partition."""
        return dict((self._accounts.get(tenant_id.encode()) or {}).get("applied_up_to", {}))

    async def apply(self, records: Sequence[SourceRecord]) -> None:
        # An account record carries the offsets it includes, so it and the seen ids need not
        # reach the changelog together: after a crash a replayed record already in the
        # account is skipped by its offset, and one whose id was saved but whose account
        # was not is applied (its id's position is this very record). The ids alone made a
        # killed worker lose usage (the kill -9 test: balance 99,590 for 99,581).
        changed: dict[str, tuple[int, Account, dict[str, int]]] = {}
        alerts: list[tuple[TokenUsage | TokenDebit, int, Account]] = []
        applied: dict[int, dict[str, str]] = defaultdict(dict)
        in_batch: set[str] = set()
        # Counted per batch: a labelled counter per event was a measurable share of the fold.
        counts: Counter[str] = Counter()
        for message in records:
            try:
                token_event = _TOKEN_EVENT.validate_json(message.value)
            except ValidationError as exc:
                await dead_letter_record(
                    self._dead_letters, message, describe_validation_error(exc), "invalid_event"
                )
                continue
            event_id = token_event.event_id
            source = f"{message.topic}:{message.partition}"
            position = f"{source}:{message.offset}"
            tenant = token_event.tenant_id
            if tenant in changed:
                partition, account, up_to = changed[tenant]
            else:
                partition, account = message.partition, self.account(tenant)
                up_to = self._applied_up_to(tenant)
            if event_id in in_batch:
                counts["duplicate"] += 1
                continue
            in_batch.add(event_id)
            if message.offset <= up_to.get(source, -1):
                # Already in the account (a replay after a crash): only its id is recorded.
                counts["duplicate"] += 1
                if event_id not in self._seen:
                    applied[message.partition][event_id] = position
                continue
            if event_id in self._seen and self._seen.position_of(event_id) != position:
                counts["duplicate"] += 1
                continue
            applied[message.partition][event_id] = position
            up_to[source] = message.offset  # a copy of the table's, made once per batch
            if isinstance(token_event, TokenUsage):
                outcome = spend(account, token_event.tokens)
                alerts.extend((token_event, percent, outcome.account) for percent in outcome.alerts)
                counts["usage"] += 1
            elif isinstance(token_event, TokenCredit):
                outcome = credit(account, token_event.tokens)
                counts["credit"] += 1
            else:
                outcome = debit(account, token_event.tokens)
                alerts.extend((token_event, percent, outcome.account) for percent in outcome.alerts)
                counts["debit"] += 1
            changed[tenant] = (message.partition, outcome.account, up_to)
        self._seen.add(applied)
        for kind, count in counts.items():
            TOKEN_EVENTS.labels(kind).inc(count)
        now = datetime.now(UTC)
        # Effects first, then the accounts that mark their records applied: the status and
        # the alerts exist only for a flip or a crossing, which a replay of records already in
        # the account does not see again. Written first, an account reached its changelog
        # while a status send waited (on metadata, on a full batch), and a worker killed then
        # left the tenant paused after its top-up, or unpaused and spending, for good.
        for usage, percent, account in alerts:
            await self._alert(usage, percent, account)
        for tenant, (partition, account, up_to) in changed.items():
            key = tenant.encode()
            before = self._accounts.get(key)
            flipped = before is None or Account.from_dict(before).paused != account.paused
            published = self._published(tenant)
            # Workers gate on the paused flag only: a status record when it flips (or for a
            # new account), not one per batch of a busy tenant. Also when the topic says
            # otherwise: a worker killed after a flip's status and before its account, then
            # replaying a batch that flipped back, saw no flip, and the tenant stayed paused
            # with tokens (or spending at zero) for good.
            if flipped or published is None or published.paused != account.paused:
                status = TenantStatus(
                    tenant_id=tenant, balance=account.balance, paused=account.paused,
                    updated_at=now,
                )  # fmt: skip
                await self._status_topic.send(key=key, value=status.model_dump_json().encode())
                if flipped and before is not None:
                    # Waits for PostgreSQL: raised, an outage during any flip stopped the
                    # worker, at every restart, between the status and the account.
                    await while_unreachable(self._audit_flip, tenant, account)
            put_in_partition(
                self._accounts, partition, key, {**account.as_dict(), "applied_up_to": up_to}
            )
            _gauge_account(tenant, account)

    def republish_gauges(self, owns: Callable[[bytes], bool]) -> None:
        """After a recovery: the gauges of the accounts this worker is active for, and none of
        the others. Set only when a token event came, a restarted worker exported nothing for
        a quiet paused tenant (its alert resolved while it stayed paused), and the previous
        owner kept exporting moved accounts' old figures."""
        for gauge in (TOKEN_BALANCE, TOKEN_CYCLE_USED_PERCENT, TOKEN_TENANT_PAUSED):
            gauge.clear()
        for key, state in self._accounts.items():
            if state and owns(key):
                _gauge_account(key.decode(), Account.from_dict(state))

    async def _audit_flip(self, tenant_id: str, account: Account) -> None:
        action = "tenant.paused" if account.paused else "tenant.resumed"
        try:
            await audit.record(
                await self._pool(), tenant_id=tenant_id, actor="system", action=action,
                target=tenant_id, details={"balance": account.balance},
                # The account's totals identify the flip: a replayed batch adds no second entry.
                # Debits too (a refund pauses a tenant at the credited and used totals of the
                # credit that resumed it, and that pause went unaudited), appended only when
                # there are any, so the keys of flips before debits existed stay the same.
                event_key=f"tenant-status|{tenant_id}|{account.credited}|{account.used}"
                + (f"|{account.debited}" if account.debited else ""),
            )  # fmt: skip
        except asyncpg.PostgresError as exc:
            if not is_poison(exc):
                raise
            # No such tenant (deleted, or an id that is not one): nothing to audit it against,
            # and raising failed the whole fetch of token events at every restart.
            logger.warning("%s of tenant %r not audited: %s", action, tenant_id, exc)

    async def _alert(self, usage: TokenUsage | TokenDebit, percent: int, account: Account) -> None:
        if percent >= 100:
            title = "Tokens exhausted: AI paused"
            body = (
                "Your tokens are used up. AI qualification, re-engagement and recovery are "
                "paused; messages are still recorded and resume once you top up."
            )
        else:
            title = f"{percent}% of your tokens used"
            body = (
                f"{account.cycle_used} of the {account.cycle_base} tokens of your last top-up "
                f"are used; {max(account.balance, 0)} remain."
            )
        notification = Notification(
            # One alert per threshold and cycle, whichever event crossed it.
            event_id=name_based_id(
                _ALERT_NAMESPACE, f"{usage.tenant_id}|{account.cycles}|{percent}"
            ),
            tenant_id=usage.tenant_id,
            occurred_at=datetime.now(UTC),
            audience="admins",
            category="token_threshold",
            title=title,
            body=body,
            data={
                "percent": percent,
                "balance": account.balance,
                "cycle_used": account.cycle_used,
                "cycle_base": account.cycle_base,
            },
        )
        await self._notifications.send(
            key=usage.tenant_id.encode(), value=notification.model_dump_json().encode()
        )


class TenantStatusView:
    """Every tenant's latest status, read from the compacted tenant-status topic.

    A plain consumer without a group, assigned every partition from the beginning, so each
    worker (and only this reader) sees all tenants.
    """

    def __init__(self, bootstrap_servers: str, topic: str, partitions: int) -> None:
        self._bootstrap = bootstrap_servers
        self._topic = topic
        self._partitions = partitions
        self._statuses: dict[str, TenantStatus] = {}
        # Per partition, the offset after the last status applied.
        self._next_offsets: dict[int, int] = {}
        self._loaded = asyncio.Event()
        self._listeners: list[Callable[[TenantStatus], None]] = []

    def on_change(self, listener: Callable[[TenantStatus], None]) -> None:
        self._listeners.append(listener)

    def status(self, tenant_id: str) -> TenantStatus | None:
        return self._statuses.get(tenant_id)

    def is_paused(self, tenant_id: str) -> bool:
        status = self._statuses.get(tenant_id)
        # No account yet: the tenant has never had tokens.
        return status is None or status.paused

    def is_loaded(self) -> bool:
        """Whether every status written before the reader started has been read."""
        return self._loaded.is_set()

    async def wait_loaded(self, timeout_s: float = 30.0) -> None:
        if self._loaded.is_set():
            # Every AI action asks; `wait_for` would start a task for each (Python 3.11).
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), timeout_s)

    async def run(self) -> None:
        while True:
            try:
                await self._consume()
            # A dead reader would leave every gate on stale statuses: whatever went wrong,
            # log it and read again.
            except Exception:
                logger.exception("tenant status reader failed; restarting")
                await asyncio.sleep(1)

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, group_id=None, enable_auto_commit=False
        )
        back_off_failed_metadata_updates(consumer._client)
        await consumer.start()
        try:
            # Every topic has the co-partitioned count (flexoraa.kafka.ensure_topics checks).
            assigned = [TopicPartition(self._topic, p) for p in range(self._partitions)]
            # Asked before the assignment: once assigned, the consumer's first fetch (held by
            # the broker up to fetch_max_wait_ms, 500 ms, when there is nothing to read) goes
            # out on the same connection and this request waited behind it.
            end_offsets = await consumer.end_offsets(assigned)
            consumer.assign(assigned)
            # A restarted reader goes on from where it was: read from the beginning again, the
            # topic's uncompacted head set tenants back to older statuses until it caught up.
            fresh = [tp for tp in assigned if tp.partition not in self._next_offsets]
            if fresh:
                await consumer.seek_to_beginning(*fresh)
            for tp in assigned:
                if tp.partition in self._next_offsets:
                    consumer.seek(tp, self._next_offsets[tp.partition])
            while True:
                # Checked before each read too: an empty topic is loaded at once.
                if not self._loaded.is_set():
                    positions = {tp: await consumer.position(tp) for tp in end_offsets}
                    if all(positions[tp] >= end for tp, end in end_offsets.items()):
                        self._loaded.set()
                        logger.info("tenant statuses loaded: %d tenants", len(self._statuses))
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batches.values():
                    for record in records:
                        self._apply(record.value)
                        self._next_offsets[record.partition] = record.offset + 1
        finally:
            await consumer.stop()

    def _apply(self, raw: bytes | None) -> None:
        if raw is None:
            return
        try:
            status = TenantStatus.model_validate_json(raw)
        except ValidationError:
            logger.warning("undecodable tenant status skipped")
            return
        previous = self._statuses.get(status.tenant_id)
        # The log's order is the truth (a tenant's statuses share a partition, written by its
        # account's one owner): comparing `updated_at` dropped a flip written after a
        # rebalance by a worker whose clock was behind, until the next flip.
        self._statuses[status.tenant_id] = status
        if previous is None or previous.paused != status.paused:
            for listener in self._listeners:
                listener(status)


# Runs a deferred action: (lead key, the payloads deferred for it, the lead's session).
Resumer = Callable[[bytes, list[Any], dict[str, Any] | None], Awaitable[None]]


class AiGate:
    """Asked before every AI action; keeps a paused tenant's actions and resumes them."""

    def __init__(
        self,
        view: TenantStatusView,
        scheduler: Scheduler,
        deferred: TableT[bytes, Any],
        sessions: TableT[bytes, Any],
    ) -> None:
        self._view = view
        self._scheduler = scheduler
        self._deferred = deferred
        self._sessions = sessions
        self._resumers: dict[str, Resumer] = {}
        self._lead_locks = KeyLocks()
        # This worker's leads with deferred work, by tenant (rebuilt after every recovery).
        self._waiting: dict[str, set[bytes]] = defaultdict(set)
        # A resume failing for a reason of its own, by lead, until its deadline is dead-lettered:
        # the kind and how many of its actions (the first ones deferred) were being resumed.
        self._failed_resumes: dict[bytes, tuple[str, int]] = {}
        # Told that a kind's deferred actions of a lead were dropped (`dead_lettered`).
        self._on_dropped: dict[str, Callable[[bytes], None]] = {}
        # Leads whose deferred actions are being resumed now (`_resume_held`).
        self._resuming: set[bytes] = set()

    def add_resumer(
        self, kind: str, resumer: Resumer, on_dropped: Callable[[bytes], None] | None = None
    ) -> None:
        """`on_dropped(key)`: the lead's deferred actions of this kind failed for a reason of
        their own and were dead-lettered; the kind's own state must go on without them."""
        self._resumers[kind] = resumer
        if on_dropped is not None:
            self._on_dropped[kind] = on_dropped

    def has_deferred(self, key: bytes) -> bool:
        # The entry being resumed is not "deferred" to the actions it holds: they run now.
        return key not in self._resuming and self._deferred.get(key) is not None

    async def allows(self, tenant_id: str) -> bool:
        await self._view.wait_loaded()
        return not self._view.is_paused(tenant_id)

    def defer(self, key: bytes, tenant_id: str, kind: str, payload: Any) -> None:
        """Keeps an action for later; call from the agent processing the lead."""
        entry = dict(self._deferred.get(key) or {"tenant_id": tenant_id, "actions": {}})
        actions = {k: list(v) for k, v in entry["actions"].items()}
        actions.setdefault(kind, []).append(payload)
        self._deferred[key] = {**entry, "actions": actions}
        now_ms = int(time.time() * 1000)
        pending = self._scheduler.pending(key).get(RESUME_DEADLINE)
        # A due one is the one firing now, and so is any during a resume (a top-up fires the
        # lead's deadline early): it is cancelled after its handler, so set the next. Kept,
        # an action deferred again by a resume (the tenant ran dry again) had no deadline
        # left, and no later top-up resumed it.
        if pending is None or pending <= now_ms or key in self._resuming:
            due_ms = now_ms + _RESUME_RECHECK_MS
            self._scheduler.set(key, {RESUME_DEADLINE: due_ms + (due_ms == pending)})
        self._waiting[tenant_id].add(key)
        AI_ACTIONS_DEFERRED.labels(kind).inc()

    def handlers(self) -> dict[str, DeadlineHandler]:
        return {RESUME_DEADLINE: self._resume}

    def lead_lock(self, key: bytes) -> AbstractAsyncContextManager[None]:
        """Held by an agent that may defer the lead's AI work while it asks the gate and acts,
        and by the resume of that work: a new message waits for the lead's deferred ones
        (answers are read in order) and neither works on a state the other is changing."""
        return self._lead_locks.hold(key)

    async def _resume(
        self, key: bytes, fired: DeadlineReached, session: dict[str, Any] | None
    ) -> None:
        async with self.lead_lock(key):
            await self._resume_held(key, session)

    async def _resume_held(self, key: bytes, session: dict[str, Any] | None) -> None:
        self._failed_resumes.pop(key, None)  # a failure's, left by an attempt that was retried
        entry = self._deferred.get(key)
        if entry is None:
            return
        tenant_id = entry["tenant_id"]
        if self._view.is_paused(tenant_id):
            now_ms = int(time.time() * 1000)
            self._scheduler.set(key, {RESUME_DEADLINE: now_ms + _RESUME_RECHECK_MS})
            self._waiting[tenant_id].add(key)
            return
        self._waiting[tenant_id].discard(key)
        self._resuming.add(key)
        try:
            await self._run_resumers(key, tenant_id, list(entry["actions"].items()), session)
        finally:
            self._resuming.discard(key)

    async def _run_resumers(
        self,
        key: bytes,
        tenant_id: str,
        actions: list[tuple[str, list[Any]]],
        session: dict[str, Any] | None,
    ) -> None:
        """Each kind's actions, taken out of the lead's entry only once they ran. Taken out
        first, a worker killed during a resume (a model call takes seconds) came back to an
        entry its changelog said was gone: the deadline fired again, found nothing, and the
        lead's deferred answers and recovery step were lost."""
        for kind, payloads in actions:
            resumer = self._resumers.get(kind)
            if resumer is None:
                logger.warning("no resumer for deferred %s actions; dropped", kind)
                self._take_out(key, kind, len(payloads))
                continue
            try:
                await resumer(key, payloads, session)
            except BaseException as exc:
                # Still in the entry: the deadlines agent runs this handler again while
                # PostgreSQL is unreachable, and a poison failure drops only these actions
                # (`dead_lettered`). Resumed actions that run again repeat their effects' ids.
                self._waiting[tenant_id].add(key)
                if is_poison(exc):
                    self._failed_resumes[key] = (kind, len(payloads))
                raise
            # After the resumer's effects were sent: the changelog write waits for them.
            self._take_out(key, kind, len(payloads))

    def _take_out(self, key: bytes, kind: str, count: int) -> None:
        """Removes the first `count` actions of `kind` (those resumed); actions deferred while
        they ran, appended after them, stay."""
        entry = self._deferred.get(key)
        if entry is None:
            return
        rest = {k: payloads[count:] if k == kind else payloads
                for k, payloads in entry["actions"].items()}  # fmt: skip
        rest = {k: payloads for k, payloads in rest.items() if payloads}
        if rest:
            self._deferred[key] = {**entry, "actions": rest}
        else:
            del self._deferred[key]

    def dead_lettered(self) -> dict[str, DeadLettered]:
        # A resume whose action fails for a reason of its own: that kind's deferred actions are
        # dead-lettered and dropped, and the lead's other kinds resume on the next tick (the
        # deadline was cancelled: left deferred, they waited for a top-up that had happened).
        return {RESUME_DEADLINE: DeadLettered(settle=self._drop_failed, evidence=self._failed)}

    def _failed(self, key: bytes, fired: DeadlineReached) -> Evidence | None:
        failed = self._failed_resumes.get(key)
        entry = self._deferred.get(key)
        if failed is None or entry is None:
            return None
        kind, count = failed
        actions = {kind: entry["actions"].get(kind, [])[:count]}
        # For inspection: no topic takes deferred actions back (the deadline's is named).
        return Evidence(orjson.dumps({"tenant_id": entry["tenant_id"], "actions": actions}))

    def _drop_failed(self, key: bytes, fired: DeadlineReached) -> None:
        """Drops the failed actions only: the lead's lock was free since they failed, and an
        action of the same kind deferred meanwhile stays, after them."""
        failed = self._failed_resumes.pop(key, None)
        entry = self._deferred.get(key)
        if failed is None or entry is None:
            return
        kind, count = failed
        rest = {k: payloads[count:] if k == kind else payloads
                for k, payloads in entry["actions"].items()}  # fmt: skip
        rest = {k: payloads for k, payloads in rest.items() if payloads}
        if rest:
            self._deferred[key] = {**entry, "actions": rest}
            self._scheduler.set(key, {RESUME_DEADLINE: int(time.time() * 1000)})
        else:
            del self._deferred[key]
            self._waiting[entry["tenant_id"]].discard(key)
        on_dropped = self._on_dropped.get(kind)
        if on_dropped is not None:
            on_dropped(key)

    def rebuild(self) -> None:
        self._waiting.clear()
        for key, entry in self._deferred.items():
            self._waiting[entry["tenant_id"]].add(key)

    async def release_resumed(
        self, deadlines_topic: TopicT, owned: set[int], partitions: int
    ) -> None:
        """Fires the resume deadline now for this worker's leads whose tenant has tokens."""
        for tenant_id in [t for t, keys in self._waiting.items() if keys]:
            if self._view.is_paused(tenant_id):
                continue
            keys = self._waiting.pop(tenant_id)
            for key in keys:
                if partition_of(key, partitions) not in owned:
                    continue
                due_ms = self._scheduler.pending(key).get(RESUME_DEADLINE)
                if due_ms is None:
                    continue
                command = DeadlineReached(
                    event_id=deadline_event_id(key.decode(), RESUME_DEADLINE, due_ms),
                    tenant_id=tenant_id,
                    occurred_at=datetime.now(UTC),
                    lead_id=key.decode(),
                    deadline=RESUME_DEADLINE,
                    due_ms=due_ms,
                    fired_at=datetime.now(UTC),
                )
                await deadlines_topic.send(key=key, value=command.model_dump_json().encode())


def register(
    app: AppT,
    *,
    lane: BatchLane,
    token_topics: Sequence[TopicT],
    accounts: Accounts,
    seen: SeenIds,
    gate: AiGate,
    view: TenantStatusView,
    deferred: TableT[bytes, Any],
    deadlines_topic: TopicT,
    source_topic_name: str,
    partitions: int,
    batch_max: int,
    tick_s: float,
) -> None:
    # The token topics are read in whole fetches (streams.batches), not by a Faust agent.
    lane.add_handler("token-accounts", token_topics, accounts.apply, max_batch=batch_max)

    async def read_tenant_statuses() -> None:
        await view.run()

    app.task(read_tenant_statuses)

    @deferred.on_recover
    async def rebuild_waiting() -> None:
        gate.rebuild()

    @seen.table.on_recover
    async def rebuild_seen() -> None:
        seen.rebuild()

    token_topic_names = {topic.get_topic_name() for topic in token_topics}

    def owned_token_partitions() -> set[int]:
        return {
            tp.partition for tp in app.assignor.assigned_actives() if tp.topic in token_topic_names
        }

    def held_token_partitions() -> set[int]:
        standbys = {
            tp.partition
            for tp in app.assignor.assigned_standbys()
            if tp.topic.endswith(f"-{seen.table.name}-changelog")
        }
        return owned_token_partitions() | standbys

    @accounts.table.on_recover
    async def republish_token_gauges() -> None:
        owned = owned_token_partitions()
        accounts.republish_gauges(lambda key: partition_of(key, partitions) in owned)

    @app.timer(interval=3600.0)
    async def forget_old_token_ids() -> None:
        if app.rebalancing:
            return
        forgotten = seen.prune(owned_token_partitions(), held_token_partitions())
        if forgotten:
            logger.info("forgot %d token event ids older than %.0f s", forgotten, seen.kept_s)

    @app.timer(interval=tick_s)
    async def resume_deferred_ai() -> None:
        if app.rebalancing:
            return
        owned = {
            tp.partition for tp in app.assignor.assigned_actives() if tp.topic == source_topic_name
        }
        await gate.release_resumed(deadlines_topic, owned, partitions)


def register_relay(
    app: AppT, *, pool: PoolFactory, credits_topic: TopicT, interval_s: float
) -> None:
    """Publishes committed credits (outbox) and credits subscription cycles as they start."""

    async def publish(credit_event: BalanceChange) -> None:
        sent = await credits_topic.send(
            key=credit_event.tenant_id.encode(), value=credit_event.model_dump_json().encode()
        )
        await sent  # the broker's ack (acks=all), before the row is marked published

    @app.timer(interval=interval_s)
    async def relay_outbox() -> None:
        try:
            db = await pool()
            await credit_due_subscriptions(db, datetime.now(UTC))
            while await relay_pending(db, publish) > 0:
                pass
        except (*DB_ERRORS, KafkaError) as exc:
            logger.warning("credit relay pass failed (%r); retried next tick", exc)


class Meter:
    """Charges an AI action: a token-usage event keyed by tenant, priced by the price table."""

    def __init__(
        self, usage_topic: TopicT, prices: dict[str, int], model_tokens_per_token: int
    ) -> None:
        self._topic = usage_topic
        self._prices = prices
        self._model_tokens_per_token = model_tokens_per_token

    async def charge(
        self,
        *,
        event_id: str,
        tenant_id: str,
        lead_id: str | None,
        feature: Feature,
        model: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> int:
        """Produces the usage event; returns the platform tokens charged.

        Counts are capped at what an event can carry (`MAX_TOKENS_PER_EVENT`): a model server
        reporting absurd usage is charged the cap, not left to fail the AI action."""
        prompt_tokens = min(prompt_tokens, MAX_TOKENS_PER_EVENT)
        completion_tokens = min(completion_tokens, MAX_TOKENS_PER_EVENT)
        tokens = min(
            charge(
                feature,
                prompt_tokens,
                completion_tokens,
                self._prices,
                self._model_tokens_per_token,
            ),
            MAX_TOKENS_PER_EVENT,
        )
        usage = TokenUsage(
            event_id=event_id,
            tenant_id=tenant_id,
            occurred_at=datetime.now(UTC),
            feature=feature,
            lead_id=lead_id,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tokens=tokens,
        )
        await self._topic.send(key=tenant_id.encode(), value=usage.model_dump_json().encode())
        return tokens
