"""A free-form WhatsApp message Meta failed late with 131047 is sent again as the template:
found in PostgreSQL by its wamid, also when the status is read before the sink wrote it."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, cast

from connectors.sent_messages import SentMessage
from schemas.messaging import DeliveryStatus, OutboundCommand
from streams.agents.outbound import LateWindowResends

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
    def __init__(self) -> None:
        self.sent: list[OutboundCommand] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append(OutboundCommand.model_validate(json.loads(value)))


def resends(messages: Messages, template: bool = True) -> tuple[LateWindowResends, Commands]:
    commands = Commands()
    handler = LateWindowResends(cast(Any, messages), cast(Any, commands),
                                template_configured=template,
                                lookup_delays_s=(0.0, 0.0))  # fmt: skip
    return handler, commands


FREEFORM = SentMessage(COMMAND, "Your quote is ready.", "ai", "freeform")


async def test_the_failed_message_goes_again_as_the_template_once_the_sink_has_it() -> None:
    messages = Messages(FREEFORM, misses=2)
    handler, commands = resends(messages)
    await handler.on_status(status())
    (resend,) = commands.sent
    assert (resend.template_only, resend.text, resend.sent_by) == (True, FREEFORM.text, "ai")
    assert resend.lead_id == LEAD
    await handler.on_status(status())  # Meta's repeat: the same command, sent once downstream
    assert commands.sent[1].event_id == resend.event_id


async def test_nothing_goes_again_unless_it_was_a_freeform_message_failed_for_the_window() -> None:
    for messages, state, template in [
        (Messages(None), status(), True),  # not ours (never found)
        (Messages(SentMessage(COMMAND, "t", "sdr", "template")), status(), True),
        (Messages(FREEFORM), status(code="131026"), True),
        (Messages(FREEFORM), status("delivered", None), True),
        (Messages(FREEFORM), status(), False),  # no template to send it as
    ]:
        handler, commands = resends(messages, template)
        await handler.on_status(state)
        assert commands.sent == []
    never_found = Messages(None)
    await resends(never_found)[0].on_status(status())
    assert never_found.lookups == 3  # looked up again after each delay, then given up
