"""Leads: live state from the workers' tables, history from PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header

from api.deps import PrincipalDep, Services, ServicesDep
from api.errors import DATABASE_ERRORS, ApiError
from api.lead_state import StateUnavailable
from api.models import (
    CloseRequest,
    LeadClosed,
    LeadPage,
    LeadSummary,
    LeadView,
    MessagePage,
    MessageView,
    QualificationStepView,
    QualificationView,
    ScheduledMessageView,
    SendAccepted,
    SendRequest,
    WindowView,
)
from api.paging import (
    CursorQuery,
    LimitQuery,
    cursor_time,
    decode_cursor,
    encode_cursor,
)
from connectors.sdrs import close_lead
from flexoraa.kafka import PublishUnavailable
from schemas.ids import name_based_id
from schemas.messaging import CancelScheduled, OutboundCommand
from streams.rules.window import window_state

router = APIRouter(tags=["leads"])

_NOT_FOUND = "lead not found"
_MAX_SCHEDULE_AHEAD = timedelta(days=90)


def _parse_lead_id(lead_id: str) -> str:
    # A malformed id is answered like an unknown one: a 404 reveals nothing either way.
    try:
        return str(uuid.UUID(lead_id))
    except ValueError as exc:
        raise ApiError(404, _NOT_FOUND) from exc


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _database_unavailable(exc: Exception) -> ApiError:
    return ApiError(503, "lead history is unavailable: database unreachable, retry later")


LEAD_PATH = "/api/leads/{lead_id}"


# A client's Idempotency-Key names one command per lead and tenant.
_SEND_NAMESPACE = uuid.UUID("3a7e0c52-9b1d-4f6e-8c2a-5d4b7e9f1a03")
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key", min_length=1, max_length=200,
        description="any text naming this send: a retry with it is the same message, sent once",
    ),
]  # fmt: skip


@router.get(LEAD_PATH, response_model=LeadView, responses={404: {}, 503: {}})
async def get_lead(lead_id: str, principal: PrincipalDep, services: ServicesDep) -> LeadView:
    """A lead's live state, read from the sessions table of the worker that owns it."""
    lead_id = _parse_lead_id(lead_id)
    try:
        state: dict[str, Any] | None = await services.lead_state.lead(lead_id)
    except StateUnavailable as exc:
        raise ApiError(503, "live lead state is unavailable: no worker answered") from exc
    if state is None or state["session"]["tenant_id"] != principal.tenant_id:
        raise ApiError(404, _NOT_FOUND)
    session = state["session"]
    qualification = state.get("qualification")
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    window = window_state(session["channel"], session["last_customer_message_ms"], now_ms)
    return LeadView(
        lead_id=lead_id,
        channel=session["channel"],
        contact=session["contact"],
        contact_name=session["contact_name"],
        first_message_at=_from_ms(session["first_message_ms"]),
        last_customer_message_at=_from_ms(session["last_customer_message_ms"]),
        message_count=session["message_count"],
        window=WindowView(
            applies=window.applies,
            open=window.open,
            closes_at=_from_ms(window.closes_at_ms) if window.closes_at_ms is not None else None,
        ),
        qualification=QualificationView(**qualification) if qualification else None,
        ai_actions_waiting_for_tokens=sum(
            len(ids) for ids in (state.get("deferred_ai") or {}).values()
        ),
    )


@router.get(
    "/api/leads/{lead_id}/qualification/history",
    response_model=list[QualificationStepView],
    responses={404: {}, 503: {}},
)
async def qualification_history(
    lead_id: str, principal: PrincipalDep, services: ServicesDep
) -> list[QualificationStepView]:
    """Each step of the lead's interview, with its time and source (model or built-in)."""
    lead_id = _parse_lead_id(lead_id)
    try:
        rows = await services.pool.fetch(
            """SELECT turn, status, facts, score, assigned_sdr_id, source, occurred_at
               FROM lead_qualification_state WHERE lead_id = $1 AND tenant_id = $2
               ORDER BY occurred_at, event_id""",
            lead_id,
            principal.tenant_id,
        )
    except DATABASE_ERRORS as exc:
        raise _database_unavailable(exc) from exc
    if not rows:
        owner = await services.pool.fetchval(
            "SELECT tenant_id FROM leads WHERE lead_id = $1", lead_id
        )
        if owner is None or str(owner) != principal.tenant_id:
            raise ApiError(404, _NOT_FOUND)
    return [
        QualificationStepView(
            turn=row["turn"],
            status=row["status"],
            facts=row["facts"],
            score=float(row["score"]),
            sdr_id=str(row["assigned_sdr_id"]) if row["assigned_sdr_id"] else None,
            source=row["source"],
            occurred_at=row["occurred_at"],
        )
        for row in rows
    ]


@router.post(
    "/api/leads/{lead_id}/messages",
    status_code=202,
    response_model=SendAccepted,
    responses={404: {}, 409: {"description": "Idempotency-Key used for another message"},
               422: {}, 503: {}},
)  # fmt: skip
async def send_message(
    lead_id: str,
    body: SendRequest,
    principal: PrincipalDep,
    services: ServicesDep,
    idempotency_key: IdempotencyKey = None,
) -> SendAccepted:
    """An SDR's reply: queued as an outbound command; the 24-hour window decides how it goes.

    With an `Idempotency-Key`, a retry (after a 503 or a lost answer) is the same command, sent
    once: a 503 on a Kafka timeout does not prove the record was not written."""
    lead_id = _parse_lead_id(lead_id)
    try:
        session = await services.lead_state.session(lead_id)
    except StateUnavailable as exc:
        raise ApiError(503, "live lead state is unavailable: no worker answered") from exc
    if session is None or session["tenant_id"] != principal.tenant_id:
        raise ApiError(404, _NOT_FOUND)
    now = datetime.now(UTC)
    command_id = (
        str(uuid.uuid4())
        if idempotency_key is None
        else name_based_id(_SEND_NAMESPACE, f"{principal.tenant_id}|{lead_id}|{idempotency_key}")
    )
    stored_status = (
        None
        if idempotency_key is None
        else await _same_scheduled(services, principal.tenant_id, command_id, body)
    )
    retried = stored_status is not None
    if stored_status is not None and stored_status != "scheduled":
        # Sent, failed or cancelled already: answered as it stands, not published again (its
        # past send_at would have sent it at once, once the worker forgot the command's id).
        return SendAccepted(command_id=command_id, lead_id=lead_id, send_at=body.send_at)
    # A retry is the message scheduled before, even once its time has passed (the worker then
    # sends it at once): refused as "not in the future", one Kafka never took stayed listed
    # "scheduled" for good.
    if body.send_at is not None and not retried:
        if body.send_at <= now:
            raise ApiError(422, "send_at: must be in the future (omit it to send now)")
        if body.send_at > now + _MAX_SCHEDULE_AHEAD:
            raise ApiError(422, "send_at: at most 90 days ahead")
    command = OutboundCommand(
        event_id=command_id,
        tenant_id=principal.tenant_id,
        occurred_at=now,
        lead_id=lead_id,
        text=body.text,
        sent_by="sdr",
        send_at=body.send_at,
    )
    if body.send_at is not None and not retried:
        await services.pool.execute(
            "INSERT INTO scheduled_messages (scheduled_id, tenant_id, lead_id, body, send_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scheduled_id) DO NOTHING",
            command.event_id, principal.tenant_id, lead_id, body.text, body.send_at,
        )  # fmt: skip
    try:
        await services.publisher.publish(
            services.topics.outbound_commands,
            key=lead_id.encode(),
            value=command.model_dump_json().encode(),
        )
    except PublishUnavailable as exc:
        # A timeout does not prove the record was not written. With a key, the retry it
        # invites is the same command. Without one, the row stays, cancelled: deleted, a
        # command that landed went out unlisted and could not be cancelled; cancelled, the
        # caller can send the cancel (a send that raced it is recorded "sent").
        if body.send_at is not None and idempotency_key is None:
            await services.pool.execute(
                "UPDATE scheduled_messages SET status = 'cancelled', error = $2, updated_at = now()"
                " WHERE scheduled_id = $1 AND status = 'scheduled'",
                uuid.UUID(command.event_id),
                _NOT_CONFIRMED,
            )
            raise ApiError(
                503,
                f"message not queued: Kafka is unavailable. Scheduled message {command.event_id}"
                f" is listed as cancelled; once Kafka is back, DELETE /api/scheduled-messages/"
                f"{command.event_id} makes sure it never goes out, then schedule it again"
                " (with an Idempotency-Key, a retry is the same message)",
                headers={"Retry-After": "5"},
            ) from exc
        raise ApiError(503, "message not queued: Kafka is unavailable, retry later") from exc
    return SendAccepted(command_id=command.event_id, lead_id=lead_id, send_at=body.send_at)


async def _same_scheduled(
    services: Services, tenant_id: str, scheduled_id: str, body: SendRequest
) -> str | None:
    """The status of the message this Idempotency-Key scheduled, when it is this one; None if
    the key scheduled nothing; 409 if it scheduled another (kept, the first row would be
    listed while the new one went out), also for a message to send now."""
    stored = await services.pool.fetchrow(
        "SELECT body, send_at, status FROM scheduled_messages"
        " WHERE scheduled_id = $1 AND tenant_id = $2",
        uuid.UUID(scheduled_id), tenant_id,
    )  # fmt: skip
    if stored is None:
        return None
    if (stored["body"], stored["send_at"]) != (body.text, body.send_at):
        raise ApiError(
            409, "Idempotency-Key: already used for another message (its text or send_at differ)"
        )
    return str(stored["status"])


_NOT_CONFIRMED = "not queued: Kafka did not confirm the message (a 503 answered its request)"


def _scheduled_id(scheduled_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(scheduled_id)
    except ValueError as exc:
        raise ApiError(404, "scheduled message not found") from exc


_SCHEDULED_COLUMNS = "scheduled_id, lead_id, body, send_at, status, error, created_at"


def _scheduled_view(row: Any) -> ScheduledMessageView:
    return ScheduledMessageView(
        scheduled_id=str(row["scheduled_id"]),
        lead_id=str(row["lead_id"]),
        text=row["body"],
        send_at=row["send_at"],
        status=row["status"],
        error=row["error"],
        created_at=row["created_at"],
    )


@router.get(
    "/api/scheduled-messages/{scheduled_id}",
    response_model=ScheduledMessageView,
    responses={404: {}},
)
async def get_scheduled(
    scheduled_id: str, principal: PrincipalDep, services: ServicesDep
) -> ScheduledMessageView:
    row = await services.pool.fetchrow(
        f"SELECT {_SCHEDULED_COLUMNS} FROM scheduled_messages"
        " WHERE scheduled_id = $1 AND tenant_id = $2",
        _scheduled_id(scheduled_id),
        principal.tenant_id,
    )
    if row is None:
        raise ApiError(404, "scheduled message not found")
    return _scheduled_view(row)


@router.delete(
    "/api/scheduled-messages/{scheduled_id}",
    response_model=ScheduledMessageView,
    responses={404: {}, 409: {"description": "due, sent or failed already"}, 503: {}},
)
async def cancel_scheduled(
    scheduled_id: str, principal: PrincipalDep, services: ServicesDep
) -> ScheduledMessageView:
    """Cancel a scheduled message that has not gone out yet. Idempotent: cancelling a
    cancelled message sends the cancel again (the retry of a 503) and answers 200."""
    parsed = _scheduled_id(scheduled_id)
    row = await services.pool.fetchrow(
        f"""UPDATE scheduled_messages SET status = 'cancelled', updated_at = now()
            WHERE scheduled_id = $1 AND tenant_id = $2
              AND ((status = 'scheduled' AND send_at > now()) OR status = 'cancelled')
            RETURNING {_SCHEDULED_COLUMNS}""",
        parsed,
        principal.tenant_id,
    )
    if row is None:
        # Due already: its deadline has fired or is firing, and a cancel read after the command
        # would answer "cancelled" while the message goes out.
        current = await get_scheduled(scheduled_id, principal, services)
        state = "due, being sent" if current.status == "scheduled" else current.status
        raise ApiError(409, f"the message is {state} already")
    cancel = CancelScheduled(
        event_id=str(uuid.uuid4()),
        tenant_id=principal.tenant_id,
        occurred_at=datetime.now(UTC),
        lead_id=str(row["lead_id"]),
        command_id=str(parsed),
    )
    try:
        await services.publisher.publish(
            services.topics.outbound_commands,
            key=cancel.lead_id.encode(),
            value=cancel.model_dump_json().encode(),
        )
    except PublishUnavailable as exc:
        # The row stays cancelled: a timeout does not prove the cancel was not written (put
        # back to "scheduled", a cancel that landed left it so for good, never to be sent).
        # Sent after all, the sink marks it sent.
        raise ApiError(
            503,
            "cancel not confirmed: Kafka is unavailable; cancel again to make sure",
            headers={"Retry-After": "5"},
        ) from exc
    return _scheduled_view(row)


@router.post(
    "/api/leads/{lead_id}/close",
    response_model=LeadClosed,
    responses={404: {"description": "no such lead assigned to an SDR of the tenant"}, 422: {},
               503: {}},
)  # fmt: skip
async def close(
    lead_id: str, body: CloseRequest, principal: PrincipalDep, services: ServicesDep
) -> LeadClosed:
    """An SDR closes an assigned lead (won, lost, disqualified): it stops counting against the
    SDR's `max_open_leads`. Closing again answers the first close. A closed lead stays closed,
    with its SDR."""
    parsed = _parse_lead_id(lead_id)
    try:
        closed = await close_lead(services.pool, principal.tenant_id, parsed, body.outcome)
    except DATABASE_ERRORS as exc:
        raise ApiError(503, "lead assignments are unavailable: database unreachable") from exc
    if closed is None:
        raise ApiError(404, "lead not found or not assigned to an SDR")
    sdr_id, outcome, closed_at = closed
    return LeadClosed(lead_id=parsed, sdr_id=sdr_id, outcome=outcome, closed_at=closed_at)


@router.get("/api/leads", response_model=LeadPage, responses={400: {}, 503: {}})
async def list_leads(
    principal: PrincipalDep,
    services: ServicesDep,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> LeadPage:
    """The tenant's leads, newest activity first."""
    after: tuple[datetime, str] | None = None
    if cursor is not None:
        activity, lead = decode_cursor(cursor, 2)
        try:
            after = (cursor_time(activity), str(uuid.UUID(lead)))
        except ValueError as exc:
            raise ApiError(400, "cursor: not a cursor returned by this API") from exc
    try:
        rows = await services.pool.fetch(
            """SELECT lead_id, channel, contact, contact_name, first_seen_at, last_activity_at
               FROM leads
               WHERE tenant_id = $1
                 AND ($2::timestamptz IS NULL OR (last_activity_at, lead_id) < ($2, $3::uuid))
               ORDER BY last_activity_at DESC, lead_id DESC
               LIMIT $4""",
            principal.tenant_id,
            after[0] if after else None,
            after[1] if after else None,
            limit + 1,
        )
    except DATABASE_ERRORS as exc:
        raise _database_unavailable(exc) from exc
    items = [LeadSummary(**{**dict(row), "lead_id": str(row["lead_id"])}) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = items[-1]
        next_cursor = encode_cursor(last.last_activity_at.isoformat(), last.lead_id)
    return LeadPage(items=items, next_cursor=next_cursor)


@router.get(
    "/api/leads/{lead_id}/messages", response_model=MessagePage, responses={404: {}, 503: {}}
)
async def list_messages(
    lead_id: str,
    principal: PrincipalDep,
    services: ServicesDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> MessagePage:
    """A lead's messages in the order they happened."""
    lead_id = _parse_lead_id(lead_id)
    after: tuple[datetime, str] | None = None
    if cursor is not None:
        occurred, event = decode_cursor(cursor, 2)
        try:
            after = (cursor_time(occurred), str(uuid.UUID(event)))
        except ValueError as exc:
            raise ApiError(400, "cursor: not a cursor returned by this API") from exc
    try:
        async with services.pool.acquire() as conn:
            owner = await conn.fetchval("SELECT tenant_id FROM leads WHERE lead_id = $1", lead_id)
            if owner is None or str(owner) != principal.tenant_id:
                raise ApiError(404, _NOT_FOUND)
            rows = await conn.fetch(
                """SELECT m.event_id, m.direction, m.channel, m.message_type, m.body,
                          m.channel_message_id, m.occurred_at, m.send_kind, m.sent_by,
                          coalesce(s.status, m.send_status) AS status, s.status_at,
                          coalesce(s.error_code, m.error_code) AS error_code,
                          coalesce(s.error_title, m.error_message) AS error
                   FROM messages m
                   LEFT JOIN message_statuses s
                     ON m.direction = 'outbound' AND s.tenant_id = m.tenant_id
                        AND s.channel = m.channel AND s.channel_message_id = m.channel_message_id
                   WHERE m.lead_id = $1
                     AND ($2::timestamptz IS NULL OR (m.occurred_at, m.event_id) > ($2, $3::uuid))
                   ORDER BY m.occurred_at, m.event_id
                   LIMIT $4""",
                lead_id,
                after[0] if after else None,
                after[1] if after else None,
                limit + 1,
            )
    except DATABASE_ERRORS as exc:
        raise _database_unavailable(exc) from exc
    items = [
        MessageView(
            event_id=str(row["event_id"]),
            direction=row["direction"],
            channel=row["channel"],
            message_type=row["message_type"],
            text=row["body"],
            channel_message_id=row["channel_message_id"],
            occurred_at=row["occurred_at"],
            send_kind=row["send_kind"],
            sent_by=row["sent_by"],
            status=row["status"],
            status_at=row["status_at"],
            error_code=row["error_code"],
            error=row["error"],
        )
        for row in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = items[-1]
        next_cursor = encode_cursor(last.occurred_at.isoformat(), last.event_id)
    return MessagePage(items=items, next_cursor=next_cursor)
