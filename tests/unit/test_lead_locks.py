"""One lead worked on by one agent at a time: the lock, and the deferred-AI resume holding it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, cast

from schemas.messaging import DeadlineReached
from streams.agents.tokens import RESUME_DEADLINE, AiGate, TenantStatusView
from streams.locks import KeyLocks
from streams.timers import DeadlineIndex, Scheduler

LEAD = b"lead-1"
TENANT = "00000000-0000-4000-8000-000000000001"


async def test_holders_of_one_key_take_turns_and_other_keys_do_not_wait() -> None:
    locks = KeyLocks()
    order: list[str] = []
    first_inside = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with locks.hold(LEAD):
            first_inside.set()
            await release_first.wait()
            order.append("first")

    async def second() -> None:
        async with locks.hold(LEAD):
            order.append("second")

    async def other_lead() -> None:
        async with locks.hold(b"lead-2"):
            order.append("other lead")

    running = asyncio.create_task(first())
    await first_inside.wait()
    waiting = asyncio.create_task(second())
    await other_lead()  # not blocked by lead-1's holder
    await asyncio.sleep(0.01)
    assert order == ["other lead"]
    release_first.set()
    await asyncio.gather(running, waiting)
    assert order == ["other lead", "first", "second"]
    assert len(locks) == 0  # nothing kept for idle leads


class OpenView:
    def is_paused(self, tenant_id: str) -> bool:
        return False

    async def wait_loaded(self, timeout_s: float = 30.0) -> None:
        return None


async def test_a_new_message_waits_for_the_leads_deferred_messages_to_be_resumed() -> None:
    # Before: the resume removed the deferred entry, then awaited the model and the producer;
    # the interview agent then took the lead's next message on the state being changed, and
    # one of the two steps was lost (its usage billed and its question sent).
    deferred: dict[bytes, Any] = {
        LEAD: {"tenant_id": TENANT, "actions": {"qualification": [{"text": "deferred"}]}}
    }
    scheduler = Scheduler(cast(Any, {}), DeadlineIndex())
    gate = AiGate(cast(TenantStatusView, OpenView()), scheduler, cast(Any, deferred),
                  cast(Any, {}))  # fmt: skip
    order: list[str] = []
    resuming = asyncio.Event()
    model_answers = asyncio.Event()

    async def resume_interview(key: bytes, payloads: list[Any], session: Any) -> None:
        resuming.set()
        await model_answers.wait()
        order.extend(payload["text"] for payload in payloads)

    gate.add_resumer("qualification", resume_interview)

    async def new_message() -> None:
        async with gate.lead_lock(LEAD):
            assert not gate.has_deferred(LEAD)
            order.append("new")

    now = datetime.now(UTC)
    fired = DeadlineReached(event_id="d1", tenant_id=TENANT, occurred_at=now,
                            lead_id=LEAD.decode(), deadline=RESUME_DEADLINE, due_ms=0,
                            fired_at=now)  # fmt: skip
    resume = asyncio.ensure_future(gate.handlers()[RESUME_DEADLINE](LEAD, fired, None))
    await resuming.wait()
    arriving = asyncio.create_task(new_message())
    await asyncio.sleep(0.01)
    model_answers.set()
    await asyncio.gather(resume, arriving)
    assert order == ["deferred", "new"]
