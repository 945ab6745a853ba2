"""Inbound events from channel connectors that are not built in."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request
from pydantic import ValidationError

from api.deps import PrincipalDep, ServicesDep
from api.errors import ApiError, validation_failure
from api.models import InboundAccepted, InboundMessageRequest
from flexoraa.kafka import PublishUnavailable
from schemas.events import InboundMessage
from streams.rules.identity import InvalidContact, inbound_event_id, lead_id_for, normalize_contact

router = APIRouter(tags=["events"])

# Clocks of connectors drift; a message from further in the future is a bug, not skew.
_MAX_CLOCK_SKEW = timedelta(minutes=5)
# Served by api.direct.DirectRoutes (the ingest path of every connector), declared here.
INBOUND_PATH = "/api/events/inbound"


@router.post(
    INBOUND_PATH,
    status_code=202,
    response_model=InboundAccepted,
    responses={
        400: {"description": "malformed JSON or a body that is not UTF-8"},
        413: {"description": "body over the size limit"},
        422: {"description": "a field is missing or wrong; the message names it"},
        503: {"description": "Kafka did not acknowledge; nothing was accepted, retry"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": InboundMessageRequest.model_json_schema()}},
        }
    },
)
async def post_inbound(
    request: Request, principal: PrincipalDep, services: ServicesDep
) -> InboundAccepted:
    """Accept a customer message; answered only once Kafka acknowledged it."""
    body = await request.body()
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        payload = InboundMessageRequest.model_validate_json(body)
    except ValidationError as exc:
        raise validation_failure(exc) from exc
    try:
        contact = normalize_contact(payload.channel, payload.contact)
    except InvalidContact as exc:
        raise ApiError(422, f"contact: {exc}") from exc

    now = datetime.now(UTC)
    occurred_at = payload.occurred_at or now
    if occurred_at > now + _MAX_CLOCK_SKEW:
        raise ApiError(422, "occurred_at: is more than 5 minutes in the future")
    tenant_id = principal.tenant_id
    lead_id = lead_id_for(tenant_id, payload.channel, contact)
    event_id = (
        inbound_event_id(tenant_id, payload.channel, payload.channel_message_id)
        if payload.channel_message_id
        else str(uuid.uuid4())
    )
    event = InboundMessage(
        event_id=event_id,
        tenant_id=tenant_id,
        occurred_at=occurred_at.astimezone(UTC),
        lead_id=lead_id,
        channel=payload.channel,
        contact=contact,
        contact_name=payload.contact_name,
        text=payload.text,
        message_type="text",
        channel_message_id=payload.channel_message_id,
        received_at=now,
    )
    try:
        await services.publisher.publish(
            services.topics.inbound_messages,
            key=lead_id.encode(),
            value=event.model_dump_json().encode(),
        )
    except PublishUnavailable as exc:
        raise ApiError(
            503,
            "event not accepted: Kafka is unavailable; nothing was recorded, retry later",
            headers={"Retry-After": "5"},
        ) from exc
    return InboundAccepted(event_id=event_id, lead_id=lead_id)
