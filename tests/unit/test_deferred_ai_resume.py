"""AI work kept while a tenant has no tokens is resumed by a top-up, including work a resume
had to keep again because the tenant ran dry in the middle of it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from schemas.messaging import DeadlineReached
from schemas.tokens import TenantStatus
from streams.agents.deadlines import DeadlineActions
from streams.agents.tokens import RESUME_DEADLINE, AiGate, TenantStatusView
from streams.poison import PoisonRecords
from streams.timers import DeadlineIndex, Scheduler
from tests.fakes.topics import RecordingTopic

TENANT = str(uuid.uuid4())
KEY = str(uuid.uuid4()).encode()
EVERY_PARTITION = set(range(8))


class View:
    paused = True

    def is_paused(self, tenant_id: str) -> bool:
        return self.paused

    async def wait_loaded(self, timeout_s: float = 30.0) -> None:
        return None


class NeverPoison:
    def should_dead_letter(self, exc: BaseException) -> bool:
        return False


async def top_up(gate: AiGate, view: View, actions: DeadlineActions) -> int:
    """The tenant's tokens are back: the tick fires the lead's resume deadline now."""
    view.paused = False
    topic = RecordingTopic()
    await gate.release_resumed(cast(Any, topic), owned=EVERY_PARTITION, partitions=8)
    for value in topic.sent:
        await actions.act_on(DeadlineReached.model_validate_json(value))
    return len(topic.sent)


async def test_work_deferred_again_during_a_resume_is_resumed_by_the_next_top_up() -> None:
    view = View()
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    deferred: dict[bytes, Any] = {}
    gate = AiGate(cast(TenantStatusView, view), scheduler, cast(Any, deferred), cast(Any, {}))
    answered: list[str] = []

    async def answer(key: bytes, messages: list[Any], session: Any) -> None:
        # As the interviewer does: keep the message if earlier ones wait or the tenant is dry.
        for message in messages:
            if gate.has_deferred(key) or not await gate.allows(TENANT):
                gate.defer(key, TENANT, "qualification", message)
                continue
            answered.append(message)
            view.paused = True  # this answer spent the last tokens

    gate.add_resumer("qualification", answer)
    gate.defer(KEY, TENANT, "qualification", "m1")
    gate.defer(KEY, TENANT, "qualification", "m2")
    actions = DeadlineActions(
        scheduler, {}, gate.handlers(), cast(PoisonRecords, NeverPoison()), {}
    )

    assert await top_up(gate, view, actions) == 1
    assert answered == ["m1"]
    assert deferred[KEY]["actions"] == {"qualification": ["m2"]}
    # Still due: the deadline fired by the top-up was cancelled after its handler, and m2
    # had none left (nothing resumed it, however many top-ups came).
    assert RESUME_DEADLINE in scheduler.pending(KEY)

    assert await top_up(gate, view, actions) == 1
    assert answered == ["m1", "m2"]
    assert KEY not in deferred


async def test_deferred_work_stays_in_its_entry_until_it_ran() -> None:
    # Deleted before the resumers ran, a worker killed during a resume (a model call takes
    # seconds) came back to an entry its changelog said was gone: the answers were lost.
    view = View()
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    deferred: dict[bytes, Any] = {}
    gate = AiGate(cast(TenantStatusView, view), scheduler, cast(Any, deferred), cast(Any, {}))
    seen_during: list[Any] = []

    async def answer(key: bytes, messages: list[Any], session: Any) -> None:
        seen_during.append(deferred.get(key, {}).get("actions"))
        assert not gate.has_deferred(key)  # its own entry holds nothing back

    gate.add_resumer("qualification", answer)
    gate.add_resumer("recovery", answer)
    gate.defer(KEY, TENANT, "qualification", "m1")
    gate.defer(KEY, TENANT, "recovery", "step")
    actions = DeadlineActions(
        scheduler, {}, gate.handlers(), cast(PoisonRecords, NeverPoison()), {}
    )
    assert await top_up(gate, view, actions) == 1
    assert seen_during == [
        {"qualification": ["m1"], "recovery": ["step"]},  # a kill here loses nothing
        {"recovery": ["step"]},  # the answers ran: taken out after their effects
    ]
    assert KEY not in deferred


def test_the_status_view_takes_the_logs_order_not_the_writers_clocks() -> None:
    # After a rebalance the account's new owner may run a clock behind the old one's: its
    # flip was dropped as older, and the tenant stayed paused (or spending) until the next.
    view = TenantStatusView("127.0.0.1:9092", "acme.tenant-status", 8)
    later = datetime.now(UTC)
    paused = TenantStatus(tenant_id=TENANT, balance=0, paused=True, updated_at=later)
    topped_up = TenantStatus(
        tenant_id=TENANT, balance=500, paused=False, updated_at=later - timedelta(seconds=2)
    )
    for status in (paused, topped_up):
        view._apply(status.model_dump_json().encode())
    assert not view.is_paused(TENANT)
