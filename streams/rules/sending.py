"""How a message goes out: free-form inside the customer-service window, a template outside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TEMPLATE_FIELDS = ("contact_name", "text", "contact")
# Meta's "re-engagement message" error: more than 24 hours since the customer last wrote.
OUTSIDE_WINDOW_ERROR = "131047"


@dataclass(frozen=True, slots=True)
class SendPlan:
    kind: Literal["freeform", "template"] | None
    failure: str | None = None


def plan_send(
    channel: str, window_open: bool, template_configured: bool, template_only: bool = False
) -> SendPlan:
    if template_only:
        if channel == "whatsapp" and template_configured:
            return SendPlan("template")
        return SendPlan(None, "only a WhatsApp template can take it, and none is configured")
    if channel == "whatsapp":
        if window_open:
            return SendPlan("freeform")
        if template_configured:
            return SendPlan("template")
        return SendPlan(None, "outside the 24-hour window and no approved template is configured")
    if channel in {"instagram", "facebook"}:
        if window_open:
            return SendPlan("freeform")
        return SendPlan(None, "outside the 24-hour standard messaging window")
    return SendPlan(None, f"no sender for the {channel} channel")


def failed_outside_window(channel: str, status: str, error_code: str | None) -> bool:
    """Whether a delivery status reports a WhatsApp message that Meta took (200) and failed
    afterwards because, by its clock, the 24-hour window had closed (131047). Sent free-form,
    it is sent again as the approved template."""
    return channel == "whatsapp" and status == "failed" and error_code == OUTSIDE_WINDOW_ERROR


# The last minutes of a WhatsApp window count as closed when a template can go instead: Meta
# often answers a free-form message 200 and reports its 131047 later, as a "failed" status,
# so one sent at the edge (a queue's delay, clocks apart) was recorded sent and never arrived.
FREEFORM_MARGIN_MS = 120_000


def freeform_window_open(
    channel: str, window_closes_at_ms: int | None, now_ms: int, template_configured: bool
) -> bool:
    """Whether a free-form message may go now: the window open, and on WhatsApp with a
    template to send instead, open for `FREEFORM_MARGIN_MS` more."""
    if window_closes_at_ms is None:
        return False
    margin = FREEFORM_MARGIN_MS if channel == "whatsapp" and template_configured else 0
    return now_ms + margin < window_closes_at_ms


def reachable(channel: str, window_open: bool, template_configured: bool) -> bool:
    """Whether a message to a lead on `channel` can go out now (e-mail has no window)."""
    return (
        channel == "email" or plan_send(channel, window_open, template_configured).kind is not None
    )


def template_parameters(
    spec: str, *, contact_name: str | None, text: str, contact: str
) -> list[str]:
    """The template's body parameters, in the configured order."""
    values = {"contact_name": contact_name or "there", "text": text, "contact": contact}
    fields = template_fields(spec)
    # One line each: Meta refuses a parameter with a newline, a tab or more than four spaces
    # in a row (error 132018), so a multi-line reply outside the window failed.
    return [" ".join(values[field].split()) for field in fields]


TEMPLATE_FIELDS = ("contact_name", "text", "contact")


def template_fields(spec: str) -> list[str]:
    """The fields named by WHATSAPP_TEMPLATE_PARAMETERS; raises ValueError on an unknown one."""
    fields = [field.strip() for field in spec.split(",") if field.strip()]
    unknown = [field for field in fields if field not in TEMPLATE_FIELDS]
    if unknown:
        raise ValueError(f"unknown template parameter(s): {', '.join(unknown)}")
    return fields
