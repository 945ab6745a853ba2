"""An e-mail lead of a tenant whose Gmail is disconnected is sent no AI message and charged
nothing for one: the send could only fail, and the tokens would be spent all the same."""

from __future__ import annotations

import json
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, cast

from schemas.messaging import OutboundCommand
from streams.agents.leakage import LeakActions
from streams.agents.recovery import MAILBOX_RETRY_MS, MAILBOX_WAIT_MS, Recovery
from streams.locks import KeyLocks
from streams.timers import DeadlineIndex, Scheduler
from tests.unit.test_effects_before_state import KEY, TENANT, MailboxTenants, fired

EMAIL_SESSION = {"tenant_id": TENANT, "channel": "email", "contact": "ana@example.com",
                 "last_customer_message_ms": 1_000, "contact_name": "Ana"}  # fmt: skip


class Records:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append(json.loads(value))

    def commands(self) -> list[OutboundCommand]:
        return [
            OutboundCommand.model_validate(r) for r in self.sent if r["kind"] == "outbound_command"
        ]


class OpenGate:
    def __init__(self) -> None:
        self._locks = KeyLocks()

    async def allows(self, tenant_id: str) -> bool:
        return True

    def lead_lock(self, key: bytes) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(key)

    def add_resumer(self, *args: Any, **kwargs: Any) -> None:
        pass


class Meter:
    def __init__(self) -> None:
        self.charges: list[dict[str, Any]] = []

    async def charge(self, **usage: Any) -> int:
        self.charges.append(usage)
        return 1


def hot_leak(connected: bool, configured: bool = True) -> tuple[LeakActions, Records, Meter]:
    records, meter = Records(), Meter()
    leakage = {KEY: {"waiting_since_ms": 1_000, "due_ms": 6_000, "fired": False}}
    actions = LeakActions(
        leakage=cast(Any, leakage), qualification=cast(Any, {KEY: {"score": 85.0}}),
        router=cast(Any, None), lead_events=cast(Any, records),
        outbound_commands=cast(Any, records), notifications=cast(Any, records),
        gate=cast(Any, OpenGate()), meter=cast(Any, meter),
        tenants=cast(Any, MailboxTenants(connected)),
        scheduler=Scheduler(cast(Any, {}), DeadlineIndex()), email_configured=configured,
    )  # fmt: skip
    return actions, records, meter


async def test_a_hot_leak_is_re_engaged_only_through_a_connected_mailbox() -> None:
    # No mailbox connected, or one connected but no Google OAuth client to send with.
    for connected, configured in [(False, True), (True, False)]:
        actions, records, meter = hot_leak(connected, configured)
        await actions.on_leak(KEY, fired("leak", 6_000), EMAIL_SESSION)
        (leak,) = [r for r in records.sent if r.get("type") == "leak_detected"]
        assert leak["data"]["action"] == "ai_reengagement"
        assert leak["data"]["ai_skipped"] == "no_mailbox"
        assert not records.commands()
        assert not meter.charges
        assert any(r.get("audience") == "admins" for r in records.sent)  # alerted all the same

    actions, records, meter = hot_leak(connected=True)
    await actions.on_leak(KEY, fired("leak", 6_000), EMAIL_SESSION)
    assert [c.purpose for c in records.commands()] == ["re_engagement"]
    assert [c["feature"] for c in meter.charges] == ["reengagement"]


@dataclass
class EmailRecovery:
    """A recovery sequence of an e-mail lead at `step`, its step before sent at `last_sent_ms`."""

    tenants: MailboxTenants
    step: int = 0
    last_sent_ms: int = field(default_factory=lambda: int(time.time() * 1000) - 60_000)
    email_configured: bool = True
    records: Records = field(default_factory=Records)
    meter: Meter = field(default_factory=Meter)
    scheduler: Scheduler = field(default_factory=lambda: Scheduler(cast(Any, {}), DeadlineIndex()))
    table: dict[bytes, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.table[KEY] = {"step": self.step, "started_ms": self.last_sent_ms,
                           "last_sent_ms": self.last_sent_ms, "time_zone": "UTC",
                           "silent_since_ms": 1_000}  # fmt: skip
        self.recovery = Recovery(
            table=cast(Any, self.table), qualification=cast(Any, {}), scheduler=self.scheduler,
            tenants=cast(Any, self.tenants), lead_events=cast(Any, self.records),
            outbound_commands=cast(Any, self.records), silence_ms=1_000, delays_s=(0, 3_600),
            local_hour=None, gate=cast(Any, OpenGate()), meter=cast(Any, self.meter),
            email_configured=self.email_configured,
        )  # fmt: skip

    async def fire(self, due_ms: int) -> None:
        await self.recovery.handlers()["recovery"](KEY, fired("recovery", due_ms), EMAIL_SESSION)


async def test_a_recovery_step_waits_for_a_connected_mailbox_uncharged() -> None:
    lead = EmailRecovery(MailboxTenants(connected=False))
    before_ms = int(time.time() * 1000)
    await lead.fire(lead.last_sent_ms)
    assert not lead.records.commands()
    assert not lead.meter.charges
    assert lead.table[KEY]["step"] == 0  # the sequence goes on, from the same step
    assert lead.scheduler.pending(KEY)["recovery"] >= before_ms + MAILBOX_RETRY_MS

    lead.tenants.connected = True  # reconnected: the step goes out when it fires again
    await lead.fire(lead.scheduler.pending(KEY)["recovery"])
    assert [c.purpose for c in lead.records.commands()] == ["recovery"]
    assert [c["feature"] for c in lead.meter.charges] == ["recovery"]
    assert lead.table[KEY]["step"] == 1


async def test_a_recovery_waiting_a_week_for_a_mailbox_ends_uncharged() -> None:
    # Waiting for good, a tenant that never connects Gmail kept every COLD e-mail lead's
    # sequence, and a mailbox connected months later sent each a stale step at once.
    week_ago = int(time.time() * 1000) - MAILBOX_WAIT_MS - 60_000
    lead = EmailRecovery(MailboxTenants(connected=False), step=1, last_sent_ms=week_ago)
    await lead.fire(week_ago)
    assert KEY not in lead.table
    assert "recovery" not in lead.scheduler.pending(KEY)
    assert not lead.records.commands()
    assert not lead.meter.charges


async def test_without_a_google_client_a_connected_mailbox_sends_nothing_either() -> None:
    lead = EmailRecovery(MailboxTenants(connected=True), email_configured=False)
    await lead.fire(lead.last_sent_ms)
    assert not lead.records.commands()
    assert not lead.meter.charges
    assert lead.table[KEY]["step"] == 0
