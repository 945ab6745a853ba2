"""Meta webhooks: WhatsApp Cloud API, Instagram and Messenger, on one signed endpoint."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from api.deps import ServicesDep, WebhookLimit
from api.errors import ApiError
from api.webhook_letters import WEBHOOK_RECORDS, item_bytes, webhook_letter
from connectors.channels import verify_token_hash
from connectors.meta import (
    SIGNATURE_HEADER,
    MalformedItem,
    MalformedPayload,
    MetaMessage,
    MetaStatus,
    matching_secret,
    parse_messaging,
    parse_whatsapp,
)
from flexoraa.kafka import PublishUnavailable
from schemas.events import InboundMessage
from schemas.latency import NO_TENANT
from schemas.messaging import DeliveryStatus
from streams.rules.identity import (
    InvalidContact,
    inbound_event_id,
    lead_id_for,
    normalize_contact,
)

logger = logging.getLogger(__name__)
router = APIRouter(tags=["webhooks"])

_DELIVERY_STATES = {"sent", "delivered", "read", "failed"}


# Limited like the deliveries: keyless, each handshake is a database query.
@router.get(
    "/webhooks/whatsapp", response_class=PlainTextResponse, responses={403: {}, 429: {}},
    dependencies=[WebhookLimit],
)  # fmt: skip
@router.get(
    "/webhooks/meta", response_class=PlainTextResponse, include_in_schema=False,
    dependencies=[WebhookLimit],
)  # fmt: skip
async def verify_subscription(
    services: ServicesDep,
    mode: Annotated[str | None, Query(alias="hub.mode")] = None,
    token: Annotated[str | None, Query(alias="hub.verify_token")] = None,
    challenge: Annotated[str | None, Query(alias="hub.challenge", max_length=256)] = None,
) -> PlainTextResponse:
    """Meta's verification handshake: echo the challenge for a registered verify token."""
    if mode == "subscribe" and token and challenge is not None:
        known = await services.pool.fetchval(
            "SELECT 1 FROM channels WHERE verify_token_hash = $1 LIMIT 1", verify_token_hash(token)
        )
        if known:
            return PlainTextResponse(challenge)
    return PlainTextResponse("verification failed", status_code=403)


@router.post(
    "/webhooks/whatsapp",
    responses={401: {"description": "missing or wrong X-Hub-Signature-256"}, 429: {}, 503: {}},
    dependencies=[WebhookLimit],
)
@router.post("/webhooks/meta", include_in_schema=False, dependencies=[WebhookLimit])
async def receive(request: Request, services: ServicesDep) -> JSONResponse:
    """Signed Meta events in; answered 200 only once Kafka acknowledged every record."""
    body = await request.body()
    header = request.headers.get(SIGNATURE_HEADER)
    # The SLA's "verification" operation: the signature check, platform-wide (the tenant is
    # known only once the body is trusted).
    with services.latency.measure("verification", tenant_id=NO_TENANT):
        secret = matching_secret(body, header, await services.channels.app_secrets())
        if secret is None:
            secret = matching_secret(body, header, await services.channels.app_secrets_after_miss())
    if secret is None:
        raise ApiError(401, "missing or invalid X-Hub-Signature-256")
    try:
        payload = json.loads(body)
        if not isinstance(payload, dict):
            raise MalformedPayload("the body is not a JSON object")
        kind = payload.get("object")
        if kind == "whatsapp_business_account":
            parsed = parse_whatsapp(payload)
        elif kind in {"instagram", "page"}:
            parsed = parse_messaging(payload)
        else:
            WEBHOOK_RECORDS.labels(str(kind)[:32], "ignored_object").inc()
            return JSONResponse({"status": "ignored", "detail": f"object {kind!r} not handled"})
    except (ValueError, RecursionError, MalformedPayload) as exc:
        # Signed by Meta, so an error answer would be retried for days, failing the same way
        # each time: kept whole on the dead-letter topic and acknowledged.
        logger.error("unparseable signed Meta webhook: %s", exc)
        await _publish(services, [_letter(services, "meta", body, f"unparseable webhook: {exc}")])
        WEBHOOK_RECORDS.labels("meta", "malformed").inc()
        return JSONResponse({"status": "unparseable", "accepted": 0, "set_aside": 1})

    source = str(kind)
    now = datetime.now(UTC)
    records: list[tuple[str, bytes | None, bytes]] = []
    accepted_ids: list[str] = []
    malformed = list(parsed.malformed)
    dropped = 0
    for message in parsed.messages:
        try:
            event = await _inbound_event(services, secret, message, now)
        except ValidationError as exc:
            malformed.append(MalformedItem(_validation_reason(exc), message.item))
            continue
        if event is None:
            dropped += 1
            continue
        if message.message_id in services.recent_message_ids:
            WEBHOOK_RECORDS.labels(message.channel, "duplicate").inc()
            continue
        records.append(
            (
                services.topics.inbound_messages,
                event.lead_id.encode(),
                event.model_dump_json().encode(),
            )
        )
        accepted_ids.append(message.message_id)
    for status in parsed.statuses:
        try:
            update = await _delivery_status(services, secret, status)
        except ValidationError as exc:
            malformed.append(MalformedItem(_validation_reason(exc), status.item))
            continue
        if update is None:
            dropped += 1
            continue
        records.append(
            (
                services.topics.delivery_status,
                update.lead_id.encode(),
                update.model_dump_json().encode(),
            )
        )
    accepted = len(records)
    for item in malformed:
        # Loud, but the batch's valid messages go on: Meta would retry the whole webhook.
        logger.error("signed %s webhook item set aside: %s", source, item.reason)
        WEBHOOK_RECORDS.labels(source[:32], "malformed").inc()
        records.append(_letter(services, source, item_bytes(item.item), item.reason))
    await _publish(services, records)
    for message_id in accepted_ids:
        services.recent_message_ids.add(message_id)
    return JSONResponse(
        {"status": "ok", "accepted": accepted, "dropped": dropped, "set_aside": len(malformed)}
    )


def _letter(
    services: ServicesDep, source: str, raw: bytes, reason: str
) -> tuple[str, bytes | None, bytes]:
    return (services.topics.dead_letters, None, webhook_letter(source, raw, reason))


async def _publish(services: ServicesDep, records: list[tuple[str, bytes | None, bytes]]) -> None:
    """Every record acknowledged by Kafka, or a 503 that Meta retries; the events a retry
    produces again carry the same ids (deterministic), and the sessions deduplicate them."""
    try:
        await asyncio.gather(
            *(
                services.publisher.publish(topic, key=key, value=value)
                for topic, key, value in records
            )
        )
    except PublishUnavailable as exc:
        raise ApiError(
            503, "events not accepted: Kafka is unavailable", headers={"Retry-After": "5"}
        ) from exc


def _validation_reason(exc: ValidationError) -> str:
    fields = ", ".join(".".join(str(part) for part in error["loc"]) for error in exc.errors()[:5])
    return f"refused by the event schema ({fields})"


async def _inbound_event(
    services: ServicesDep, secret: str, message: MetaMessage, now: datetime
) -> InboundMessage | None:
    channel = await services.channels.find(message.channel, message.account_id)
    if channel is None or channel.app_secret != secret:
        # Unknown numbers are answered 200 so Meta stops retrying; counted and logged.
        WEBHOOK_RECORDS.labels(message.channel, "unknown_account").inc()
        logger.warning(
            "dropped %s message for unregistered account %s", message.channel, message.account_id
        )
        return None
    try:
        contact = normalize_contact(message.channel, message.contact)
    except InvalidContact:
        WEBHOOK_RECORDS.labels(message.channel, "invalid_contact").inc()
        return None
    event = InboundMessage(
        event_id=inbound_event_id(channel.tenant_id, message.channel, message.message_id),
        tenant_id=channel.tenant_id,
        occurred_at=message.occurred_at,
        lead_id=lead_id_for(channel.tenant_id, message.channel, contact),
        channel=message.channel,
        contact=contact,
        contact_name=message.contact_name,
        text=message.text,
        message_type=message.message_type,
        channel_message_id=message.message_id,
        channel_account_id=message.account_id,
        received_at=now,
    )
    # After the model took it: a refused one is counted as set aside instead.
    WEBHOOK_RECORDS.labels(message.channel, "accepted").inc()
    return event


async def _delivery_status(
    services: ServicesDep, secret: str, status: MetaStatus
) -> DeliveryStatus | None:
    channel = await services.channels.find(status.channel, status.account_id)
    if channel is None or channel.app_secret != secret or status.status not in _DELIVERY_STATES:
        WEBHOOK_RECORDS.labels(status.channel, "status_dropped").inc()
        return None
    try:
        contact = normalize_contact(status.channel, status.recipient)
    except InvalidContact:
        WEBHOOK_RECORDS.labels(status.channel, "status_dropped").inc()
        return None
    WEBHOOK_RECORDS.labels(status.channel, "status").inc()
    return DeliveryStatus(
        event_id=inbound_event_id(
            channel.tenant_id, status.channel, f"{status.message_id}:{status.status}"
        ),
        tenant_id=channel.tenant_id,
        occurred_at=status.occurred_at,
        lead_id=lead_id_for(channel.tenant_id, status.channel, contact),
        channel=status.channel,
        channel_message_id=status.message_id,
        status=status.status,
        error_code=status.error_code,
        error_title=status.error_title,
    )
