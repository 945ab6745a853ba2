"""A free-form WhatsApp message Meta failed late with 131047 is sent again as the template:
the status becomes a request on the commands' topic, and the outbound agent finds the message
in PostgreSQL by its wamid, also when the status was read before the sink wrote it."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, cast

from connectors.sent_messages import SentMessage
from schemas.messaging import DeliveryStatus, OutboundCommand, ResendAsTemplate
from streams.agents.outbound import LateWindowResends, _requests

TENANT, LEAD = str(uuid.uuid4()), str(uuid.uuid4())
COMMAND = str(uuid.uuid4())


def status(state: str = "failed", code: str | None = "131047") -> DeliveryStatus:
    return DeliveryStatus(event_id=str(uuid.uuid4()), tenant_id=TENANT,
                          occurred_at=datetime.now(UTC), lead_id=LEAD, channel="whatsapp",
                          channel_message_id="wamid.X1", status=state,
                          error_code=code)  # fmt: skip


class Messages:
    """The sink's rows: `misses` lookups find nothing before the row is there."""

    def __init__(self, found: SentMessage | None, misses: int = 0) -> None:
        self.found, self.misses, self.lookups = found, misses, 0

    async def find(self, tenant_id: str, channel: str, wamid: str) -> SentMessage | None:
        self.lookups += 1
        return None if self.lookups <= self.misses else self.found


class Commands:
    """The commands' topic, decoded as the outbound agent decodes it."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append(_requests.validate_json(value))


def resends(messages: Messages, template: bool = True) -> tuple[LateWindowResends, Commands]:
    commands = Commands()
    handler = LateWindowResends(cast(Any, messages), cast(Any, commands),
                                template_configured=template,
                                lookup_delays_s=(0.0, 0.0))  # fmt: skip
    return handler, commands


FREEFORM = SentMessage(LEAD, COMMAND, "Your quote is ready.", "ai", "freeform")


async def test_the_failed_message_goes_again_as_the_template_once_the_sink_has_it() -> None:
    messages = Messages(FREEFORM, misses=2)
    handler, commands = resends(messages)
    await handler.on_status(status())
    (request,) = commands.sent
    assert isinstance(request, ResendAsTemplate)  # the lane hands it on, it does not wait
    assert messages.lookups == 0
    await handler.resend(request)
    assert messages.lookups == 3
    resend = commands.sent[1]
    assert isinstance(resend, OutboundCommand)
    assert (resend.template_only, resend.text, resend.sent_by) == (True, FREEFORM.text, "ai")
    assert resend.lead_id == LEAD
    # Meta's repeat: the same request and the same command (sent once: SentCommands).
    await handler.on_status(status())
    await handler.resend(commands.sent[2])
    assert (commands.sent[2].event_id, commands.sent[3].event_id) == (
        request.event_id, resend.event_id,
    )  # fmt: skip


async def test_nothing_goes_again_unless_it_was_a_freeform_message_failed_for_the_window() -> None:
    for state, template in [
        (status(code="131026"), True),
        (status("delivered", None), True),
        (status(), False),  # no template to send it as
    ]:
        handler, commands = resends(Messages(FREEFORM), template)
        await handler.on_status(state)
        assert commands.sent == []
    for messages in [Messages(None), Messages(SentMessage(LEAD, COMMAND, "t", "sdr", "template"))]:
        handler, commands = resends(messages)
        await handler.on_status(status())
        await handler.resend(commands.sent[0])
        assert len(commands.sent) == 1  # the request only
    never_found = Messages(None)
    handler, commands = resends(never_found)
    await handler.on_status(status())
    await handler.resend(commands.sent[0])
    assert never_found.lookups == 3  # looked up again after each delay, then given up


def test_a_command_without_the_new_field_set_is_written_as_before() -> None:
    # Workers of the version before refuse unknown fields (extra="forbid"): during a rolling
    # deploy every command of the new one was dead-lettered by them.
    command = OutboundCommand(event_id=COMMAND, tenant_id=TENANT, occurred_at=datetime.now(UTC),
                              lead_id=LEAD, text="Hello")  # fmt: skip
    assert "template_only" not in json.loads(command.model_dump_json())
    resend = command.model_copy(update={"template_only": True})
    assert json.loads(resend.model_dump_json())["template_only"] is True
    assert OutboundCommand.model_validate_json(resend.model_dump_json()).template_only
