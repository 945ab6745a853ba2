"""The outbound agent: every "send this to the lead" command, obeying the channel's window."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

from faust.types import AppT, EventT, StreamT, TableT, TopicT
from pydantic import Field, TypeAdapter

from connectors.channels import Channel, ChannelDirectory
from connectors.gmail import GmailApiError, GmailNotConfigured, MailboxRevoked
from connectors.gmail_send import EmailSender, NoMailbox
from connectors.sent_messages import SentMessage, SentMessages
from connectors.whatsapp import GraphApiClient, GraphApiError, Template
from flexoraa.db import while_unreachable
from flexoraa.latency import latency_tenant
from flexoraa.settings import Settings
from schemas.ids import name_based_id
from schemas.latency import LatencyEvent
from schemas.messaging import (
    CancelScheduled,
    DeadlineReached,
    DeliveryStatus,
    OutboundCommand,
    OutboundMessage,
    ResendAsTemplate,
)
from streams.agents.deadlines import DeadLettered, DeadlineHandler, Evidence
from streams.batches import BatchLane, SourceRecord, handle_as_current
from streams.dead_letters import decode_or_dead_letter, decoded_record
from streams.keyed import KeyOrderedJobs
from streams.metrics import DUPLICATE_EVENTS, OUTBOUND_SENDS
from streams.poison import PoisonRecords
from streams.rules.sending import (
    OUTSIDE_WINDOW_ERROR,
    failed_outside_window,
    freeform_window_open,
    plan_send,
    template_parameters,
)
from streams.rules.window import window_closes_at_ms
from streams.timers import Scheduler

logger = logging.getLogger(__name__)
_ATTEMPT_NAMESPACE = uuid.UUID("a4b1c7e2-5d3f-4e6a-9b8c-1d2e3f4a5b6c")
_RESEND_NAMESPACE = uuid.UUID("e07d3c5a-91b4-4f28-8a6e-2c5b7d9f1a34")
# Commands remembered per lead as sent: a replay after a crash re-reads at most the records
# since the last commit, a few per lead.
SENT_IDS_KEPT = 64


class SentCommands:
    """The ids of the commands a lead was last sent or had cancelled, so a command read again
    goes out once, and a cancelled one never.

    Commands are read again after a crash (the topic from the committed offset) and an AI step
    done before a crash may be redone when it was kept for a top-up; each carries the id of the
    action it came from, and the channel has no idempotency key of its own. Recorded after the
    send, so the changelog write waits for its report: a worker killed between the channel's
    answer and that report still sends again (nothing can tell it was sent)."""

    def __init__(self, table: TableT[bytes, Any]) -> None:
        self._table = table

    def contains(self, command: OutboundCommand) -> bool:
        return command.event_id in (self._table.get(command.lead_id.encode()) or ())

    def add(self, command: OutboundCommand) -> None:
        self.settle(command.lead_id, command.event_id)

    def settle(self, lead_id: str, command_id: str) -> None:
        """Marks the command done: sent, or cancelled before it went out."""
        key = lead_id.encode()
        known = self._table.get(key) or ()
        if command_id in known:
            return  # a cancel read again: it would push a newer id out
        self._table[key] = [*known, command_id][-SENT_IDS_KEPT:]


class Sender:
    """Sends one command: picks free-form or template, retries, reports every attempt."""

    def __init__(
        self,
        settings: Settings,
        graph: GraphApiClient,
        channels: ChannelDirectory,
        outbound_messages: TopicT,
        latency: TopicT,
        email: EmailSender,
        sent: SentCommands,
    ) -> None:
        self._sent = sent
        self._email = email
        self._latency_topic = latency
        self._settings = settings
        self._graph = graph
        self._channels = channels
        self._outbound_messages = outbound_messages

    async def send(self, command: OutboundCommand, session: dict[str, Any] | None) -> None:
        """Sends the command unless the lead was already sent it (every outcome counts: a
        failure was reported and is not retried by a replay)."""
        if self._sent.contains(command):
            DUPLICATE_EVENTS.labels("outbound_commands").inc()
            return
        await self._send(command, session)
        self._sent.add(command)

    async def _send(self, command: OutboundCommand, session: dict[str, Any] | None) -> None:
        if session is None or session["tenant_id"] != command.tenant_id:
            await self._report(
                command, 1, "unknown", None, "failed", error=("no_lead", "unknown lead")
            )
            return
        channel_kind = session["channel"]
        if channel_kind == "email":
            await self._send_email(command, session)
            return
        now_ms = int(time.time() * 1000)
        template_configured = self._settings.whatsapp_template_name is not None
        last_ms = session["last_customer_message_ms"]
        closes_at_ms = None if last_ms is None else window_closes_at_ms(last_ms)
        plan = plan_send(
            channel_kind,
            freeform_window_open(channel_kind, closes_at_ms, now_ms, template_configured),
            template_configured,
            command.template_only,
        )
        if plan.kind is None:
            await self._report(
                command, 1, channel_kind, None, "failed", error=("not_sendable", plan.failure or "")
            )
            return
        channel = await self._channel_for(
            command.tenant_id, channel_kind, session.get("account_id")
        )
        if channel is None:
            await self._report(
                command, 1, channel_kind, plan.kind, "failed",
                error=("no_channel", f"no registered {channel_kind} channel for this tenant"),
            )  # fmt: skip
            return
        kind = plan.kind
        delay_s = self._settings.whatsapp_send_backoff_ms / 1000
        # Calls made (reported as the attempt), and those counted against the maximum: the
        # template fallback is no retry. Counted, a 131047 on the last attempt ended the loop
        # with "retrying" as the last word: the message never went and nothing said so.
        attempt = tries = 0
        while True:
            attempt += 1
            tries += 1
            started = time.perf_counter()
            try:
                message_id = await self._attempt(channel, kind, command, session)
            except GraphApiError as exc:
                await self._latency(command, started, ok=False, detail=exc.code)
                error = (exc.code or str(exc.status), exc.message)
                if (
                    exc.code == OUTSIDE_WINDOW_ERROR
                    and kind == "freeform"
                    and channel_kind == "whatsapp"
                ):
                    # Meta says the window is closed (clocks differ): fall back to the template.
                    if self._settings.whatsapp_template_name is None:
                        await self._report(
                            command, attempt, channel_kind, kind, "failed", error=error
                        )
                        return
                    await self._report(
                        command, attempt, channel_kind, kind, "retrying", error=error
                    )
                    kind = "template"
                    tries -= 1
                    continue
                last = tries >= self._settings.whatsapp_send_max_attempts
                if exc.retryable and not last:
                    await self._report(
                        command, attempt, channel_kind, kind, "retrying", error=error
                    )
                    await asyncio.sleep(delay_s)
                    delay_s *= 2
                    continue
                await self._report(command, attempt, channel_kind, kind, "failed", error=error)
                return
            # Successes are calls too: counted only when they failed, a tenant's one retried
            # 503 among a thousand good sends was an error rate of 100 %.
            await self._latency(command, started, ok=True, detail=None)
            await self._report(
                command, attempt, channel_kind, kind, "accepted", message_id=message_id
            )
            return

    async def _send_email(self, command: OutboundCommand, session: dict[str, Any]) -> None:
        """E-mail has no window: through the tenant's Gmail, in the lead's thread."""
        started = time.perf_counter()
        try:
            sent = await self._email.send(
                command.tenant_id, to=session["contact"], body=command.text,
                lead_id=command.lead_id,
            )  # fmt: skip
        except NoMailbox as exc:
            await self._report(command, 1, "email", None, "failed", error=("no_channel", str(exc)))
            return
        except (GmailApiError, MailboxRevoked, GmailNotConfigured) as exc:
            await self._latency(command, started, ok=False, detail=type(exc).__name__)
            await self._report(command, 1, "email", "freeform", "failed", error=("gmail", str(exc)))
            return
        await self._latency(command, started, ok=True, detail=None)
        await self._report(
            command, 1, "email", "freeform", "accepted", message_id=sent.gmail_message_id
        )

    async def _latency(
        self, command: OutboundCommand, started: float, *, ok: bool, detail: str | None
    ) -> None:
        """One SLA latency event per channel call (operation outbound_send)."""
        event = LatencyEvent(
            event_id=str(uuid.uuid4()),
            tenant_id=latency_tenant(command.tenant_id),
            occurred_at=datetime.now(UTC),
            operation="outbound_send",
            duration_ms=(time.perf_counter() - started) * 1000,
            outcome="ok" if ok else "error",
            detail=detail,
        )
        await self._latency_topic.send(key=b"outbound_send", value=event.model_dump_json().encode())

    async def _channel_for(
        self, tenant_id: str, kind: str, account_id: str | None
    ) -> Channel | None:
        if account_id:
            channel = await self._channels.find(kind, account_id)
            if channel is not None and channel.tenant_id == tenant_id:
                return channel
        # A lead that arrived through the generic inbound API: the tenant's first channel.
        candidates = await self._channels.for_tenant(tenant_id, kind)
        return candidates[0] if candidates else None

    async def _attempt(
        self, channel: Channel, kind: str, command: OutboundCommand, session: dict[str, Any]
    ) -> str:
        contact = session["contact"]
        if channel.kind != "whatsapp":
            return await self._graph.send_page_text(
                channel.external_id, channel.access_token, contact, command.text
            )
        if kind == "freeform":
            return await self._graph.send_whatsapp_text(
                channel.external_id, channel.access_token, contact, command.text
            )
        assert self._settings.whatsapp_template_name is not None
        template = Template(
            name=self._settings.whatsapp_template_name,
            language=self._settings.whatsapp_template_language,
            parameters=template_parameters(
                self._settings.whatsapp_template_parameters,
                contact_name=session.get("contact_name"),
                text=command.text,
                contact=contact,
            ),
        )
        return await self._graph.send_whatsapp_template(
            channel.external_id, channel.access_token, contact, template
        )

    async def _report(
        self,
        command: OutboundCommand,
        attempt: int,
        channel: str,
        kind: str | None,
        status: str,
        *,
        message_id: str | None = None,
        error: tuple[str, str] | None = None,
    ) -> None:
        OUTBOUND_SENDS.labels(channel, kind or "none", status).inc()
        message = OutboundMessage(
            event_id=name_based_id(_ATTEMPT_NAMESPACE, f"{command.event_id}|{attempt}|{kind}"),
            tenant_id=command.tenant_id,
            occurred_at=datetime.now(UTC),
            lead_id=command.lead_id,
            command_id=command.event_id,
            attempt=attempt,
            channel=channel,
            send_kind=kind,
            status=status,
            channel_message_id=message_id,
            text=command.text,
            sent_by=command.sent_by,
            error_code=error[0] if error else None,
            error_message=error[1][:1000] if error else None,
        )
        await self._outbound_messages.send(
            key=command.lead_id.encode(), value=message.model_dump_json().encode()
        )


class LateWindowResends:
    """A free-form WhatsApp message that Meta answered 200 and failed later with 131047 (its
    clock had the window closed) is sent again as the approved template.

    The margin before the window's end (streams.rules.sending) makes this rare; without it the
    message was recorded as sent and never arrived. The status becomes a request on the
    commands' topic (the lane never waits on it); the outbound agent finds the failed message
    in PostgreSQL by its wamid and sends its text again. A status read before the sink wrote
    that row (both topics' backlogs after a restart) is looked up again for about half a
    minute, holding only its lead's commands. The resend's id comes from the command's, so a
    status Meta repeats, or one read again, sends it once (SentCommands)."""

    def __init__(
        self,
        messages: SentMessages,
        outbound_commands: TopicT,
        *,
        template_configured: bool,
        lookup_delays_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0),
    ) -> None:
        self._messages = messages
        self._outbound_commands = outbound_commands
        self._template_configured = template_configured
        self._lookup_delays_s = lookup_delays_s

    def request_for(self, status: DeliveryStatus) -> ResendAsTemplate | None:
        """The resend a status asks for, or None."""
        if not self._template_configured or not failed_outside_window(
            status.channel, status.status, status.error_code
        ):
            return None
        return ResendAsTemplate(
            event_id=name_based_id(
                _RESEND_NAMESPACE, f"{status.tenant_id}|{status.channel_message_id}"
            ),
            tenant_id=status.tenant_id,
            occurred_at=status.occurred_at,
            lead_id=status.lead_id,
            channel=status.channel,
            channel_message_id=status.channel_message_id,
        )

    async def on_status(self, status: DeliveryStatus) -> None:
        if (request := self.request_for(status)) is not None:
            await self._outbound_commands.send(
                key=status.lead_id.encode(), value=request.model_dump_json().encode()
            )

    async def resend(self, request: ResendAsTemplate) -> None:
        failed = await self._find(request)
        if failed is None:
            logger.warning("131047 for %s, a message not recorded as sent; not resent",
                           request.channel_message_id)  # fmt: skip
            return
        if failed.send_kind != "freeform":
            return
        command = OutboundCommand(
            event_id=name_based_id(_RESEND_NAMESPACE, f"{failed.command_id}|template"),
            tenant_id=request.tenant_id,
            occurred_at=datetime.now(UTC),
            # The lead the message was sent to, as recorded.
            lead_id=failed.lead_id,
            text=failed.text,
            sent_by="ai" if failed.sent_by == "ai" else "sdr",
            purpose="window_resend",
            template_only=True,
        )
        await self._outbound_commands.send(
            key=command.lead_id.encode(), value=command.model_dump_json().encode()
        )

    async def _find(self, request: ResendAsTemplate) -> SentMessage | None:
        for delay_s in (*self._lookup_delays_s, None):
            found = await while_unreachable(
                self._messages.find, request.tenant_id, request.channel,
                request.channel_message_id,
            )  # fmt: skip
            if found is not None or delay_s is None:
                return found
            await asyncio.sleep(delay_s)
        return None


def register_resends(
    lane: BatchLane, *, delivery_status: TopicT, resends: LateWindowResends, max_batch: int
) -> None:
    async def resend_if_late(record: SourceRecord) -> None:
        # The statuses' sink dead-letters records it cannot decode.
        status = decoded_record(record, DeliveryStatus)
        if status is not None:
            await resends.on_status(status)

    lane.add_record_handler(
        "late-window-resends", [delivery_status], resend_if_late, max_batch=max_batch
    )


OutboundRequest = Annotated[
    OutboundCommand | CancelScheduled | ResendAsTemplate, Field(discriminator="kind")
]
_requests: TypeAdapter[OutboundCommand | CancelScheduled | ResendAsTemplate] = TypeAdapter(
    OutboundRequest
)


def _held_command_id(fired: DeadlineReached) -> str:
    return fired.deadline.split(":", 1)[1]  # "scheduled:<command id>"


class ScheduledSends:
    """Commands with a future `send_at`, held per lead until their deadline fires."""

    def __init__(
        self,
        table: TableT[bytes, Any],
        scheduler: Scheduler,
        outbound_commands: TopicT,
        sent: SentCommands,
    ) -> None:
        self._table = table
        self._scheduler = scheduler
        self._outbound_commands = outbound_commands
        self._sent = sent

    def hold(self, command: OutboundCommand) -> None:
        if self._sent.contains(command):
            # Cancelled (or sent) before: a copy read again, or its dead letter replayed.
            DUPLICATE_EVENTS.labels("outbound_commands").inc()
            return
        assert command.send_at is not None
        self._hold(command, int(command.send_at.timestamp() * 1000))

    def hold_until_session(self, command: OutboundCommand) -> None:
        """A command for a lead whose session is not in the table yet: after a crash the
        sessions agent replays the lead's first message while this agent may already replay
        the command it caused. Held as due now: the deadline timer fires it once the session
        is there (it skips leads without one), and it goes out instead of failing."""
        self._hold(command, int(time.time() * 1000))

    def _hold(self, command: OutboundCommand, due_ms: int) -> None:
        key = command.lead_id.encode()
        held = dict(self._table.get(key) or {})
        held[command.event_id] = command.model_dump_json()
        self._table[key] = held
        self._scheduler.set(key, {f"scheduled:{command.event_id}": due_ms})

    def cancel(self, request: CancelScheduled) -> None:
        # Remembered as done even when nothing is held: a command dead-lettered when it fell
        # due, then cancelled, is not sent when its letter is replayed.
        self._sent.settle(request.lead_id, request.command_id)
        key = request.lead_id.encode()
        held = dict(self._table.get(key) or {})
        if held.pop(request.command_id, None) is None:
            return
        self._keep(key, held)
        self._scheduler.cancel(key, f"scheduled:{request.command_id}")

    def handlers(self) -> dict[str, DeadlineHandler]:
        return {"scheduled": self._due}

    def dead_lettered(self) -> dict[str, DeadLettered]:
        # The held command is what failed to go out: dead-lettered in the deadline's place and
        # dropped, or it stayed held, its deadline gone, for the lead's lifetime.
        return {"scheduled": DeadLettered(settle=self._drop, evidence=self._held)}

    def _held(self, key: bytes, fired: DeadlineReached) -> Evidence | None:
        raw = (self._table.get(key) or {}).get(_held_command_id(fired))
        if raw is None:
            return None
        # Replayed onto the commands topic, it is held again until its send time, or sent.
        return Evidence(raw.encode(), self._outbound_commands.get_topic_name())

    def _drop(self, key: bytes, fired: DeadlineReached) -> None:
        held = dict(self._table.get(key) or {})
        if held.pop(_held_command_id(fired), None) is not None:
            self._keep(key, held)

    def _keep(self, key: bytes, held: dict[str, str]) -> None:
        """The lead's held commands; none: the key goes (an empty entry per lead that was
        ever sent a scheduled message stayed, in memory and changelog, for good)."""
        if held:
            self._table[key] = held
        elif key in self._table:
            del self._table[key]

    async def _due(
        self, key: bytes, fired: DeadlineReached, session: dict[str, Any] | None
    ) -> None:
        command_id = _held_command_id(fired)
        raw = (self._table.get(key) or {}).get(command_id)
        if raw is None:
            return  # cancelled
        # Back to the outbound agent, due now: it sends leads at once, and this agent never
        # waits on a channel (a campaign's sends went out one at a time, every other deadline
        # behind them). It judges the window when it sends; the command's id makes a
        # re-fired deadline's copy a duplicate it recognises.
        due_now = OutboundCommand.model_validate_json(raw).model_copy(update={"send_at": None})
        await self._outbound_commands.send(key=key, value=due_now.model_dump_json().encode())
        # Removed after the command is produced, so the changelog write waits for it; read
        # again, as other commands of the lead may have been held or cancelled meanwhile.
        held = dict(self._table.get(key) or {})
        if held.pop(command_id, None) is not None:
            self._keep(key, held)


def register(
    app: AppT,
    *,
    outbound_commands: TopicT,
    dead_letters: TopicT,
    sessions: TableT[bytes, Any],
    sender: Sender,
    scheduled: ScheduledSends,
    resends: LateWindowResends,
    concurrency: int,
    poison: PoisonRecords,
) -> None:
    async def send_outbound(record: SourceRecord) -> None:
        request = await decode_or_dead_letter(_requests.validate_json, record, dead_letters)
        if request is None:
            return
        if isinstance(request, CancelScheduled):
            scheduled.cancel(request)
        elif isinstance(request, ResendAsTemplate):
            await resends.resend(request)
        elif request.send_at is not None and request.send_at > datetime.now(UTC):
            scheduled.hold(request)
        elif (session := sessions.get(request.lead_id.encode())) is None:
            scheduled.hold_until_session(request)
        else:
            await while_unreachable(sender.send, request, session)

    # A Faust agent, not a batch lane handler: sends wait on an outside service, and the
    # stream's own buffer keeps a slow or failing Graph API from holding the other topics'
    # fetches (the lane acknowledges a fetch, all topics, once every handler is done with it).
    @app.agent(outbound_commands, name="outbound")
    async def send_commands(stream: StreamT[bytes]) -> None:
        sends = KeyOrderedJobs(concurrency, on_failure=app.crash)

        async def send_and_acknowledge(event: EventT[bytes]) -> None:
            # A command failing for what it carries is dead-lettered, not a worker stopped at
            # every restart (streams.poison): it would never go out, so the lead's later
            # commands go on. A transient failure still stops the jobs (and the worker).
            await poison.handle(partial(handle_as_current, send_outbound), event.message)
            # Acknowledged once sent, not when the next command is read: the committed
            # offset never passes a command still being sent.
            await stream.ack(event)

        stream.enable_acks = False
        try:
            # Commands are keyed by lead: a lead's go out in order, leads' sends overlap.
            async for event in stream.events():
                await sends.submit(event.message.key, partial(send_and_acknowledge, event))
        finally:
            # The worker is stopping and the drain is over: a send still unfinished is ended
            # here, not dropped half way by the closing loop, and said. Cancelled and logged
            # before any await: the stopping worker cancels this agent again within
            # milliseconds. (An agent that failed stops the worker too, its sends finishing
            # meanwhile.)
            unfinished, started = sends.cancel_unfinished() if app.should_stop else (0, 0)
            if unfinished:
                logger.warning(
                    "stopped %d unfinished sends, %d of them in progress (the channel may "
                    "have taken those); their commands are read again after a restart",
                    unfinished,
                    started,
                )
            await sends.wait_all()
