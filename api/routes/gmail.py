"""Gmail: connect a mailbox (OAuth consent and callback), integration status, sending."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import ConfigDict, EmailStr, Field, model_validator

from api.deps import AdminDep, PrincipalDep, ServicesDep
from api.errors import ApiError
from api.lead_state import StateUnavailable
from api.models import RequestBody
from connectors.gmail import GmailApiError, GmailNotConfigured, Mailbox, MailboxRevoked
from connectors.gmail_send import NoMailbox
from flexoraa.kafka import PublishUnavailable
from schemas.messaging import OutboundMessage

logger = logging.getLogger(__name__)
router = APIRouter(tags=["integrations"])
_NOT_CONFIGURED = "Gmail is not configured: set GMAIL_CLIENT_ID and GMAIL_CLIENT_SECRET"
_STATE_REFUSED = "state: unknown, expired or already used; start from auth-url again"


@router.get("/api/integrations/gmail/auth-url", responses={503: {}})
async def auth_url(principal: AdminDep, services: ServicesDep) -> dict[str, str]:
    """Google's consent URL; its `state` is bound to the caller's tenant, expires, works once."""
    if not services.gmail_oauth.configured:
        raise ApiError(503, _NOT_CONFIGURED)
    state = secrets.token_urlsafe(32)
    expires_at = datetime.now(UTC) + timedelta(seconds=services.settings.gmail_state_ttl_s)
    await services.pool.execute(
        "INSERT INTO oauth_states (state, tenant_id, provider, expires_at) VALUES ($1, $2, $3, $4)",
        state, principal.tenant_id, "gmail", expires_at,
    )  # fmt: skip
    return {
        "url": services.gmail_oauth.consent_url(state),
        "state": state,
        "expires_at": expires_at.isoformat(),
    }


@router.get("/api/integrations/gmail/callback", responses={400: {}, 503: {}})
async def callback(
    services: ServicesDep,
    code: Annotated[str, Query(min_length=1, max_length=2048)],
    state: Annotated[str, Query(min_length=1, max_length=200)],
) -> dict[str, Any]:
    """Google redirects the browser here. It connects nothing: whoever's browser this is,
    `POST /api/integrations/gmail/connect` with an admin key of the tenant that asked for
    the consent URL does. Connected here, a tenant's admin could send its consent URL to
    anyone and read the mailbox of whoever consented (a phished consent)."""
    if not services.gmail_oauth.configured:
        raise ApiError(503, _NOT_CONFIGURED)
    pending = await services.pool.fetchval(
        "SELECT 1 FROM oauth_states WHERE state = $1 AND provider = 'gmail'"
        " AND used_at IS NULL AND expires_at > now()",
        state,
    )
    if pending is None:
        raise ApiError(400, _STATE_REFUSED)
    return {
        "status": "consented",
        "code": code,
        "state": state,
        "next": "POST /api/integrations/gmail/connect with {code, state} and an admin key of"
        " the tenant that asked for the consent URL",
    }


class ConnectRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(min_length=1, max_length=2048)
    state: str = Field(min_length=1, max_length=200)


@router.post("/api/integrations/gmail/connect", responses={400: {}, 502: {}, 503: {}})
async def connect(
    body: ConnectRequest, principal: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    """Exchanges Google's code for the mailbox's tokens (stored AES-GCM encrypted), reads its
    profile and starts polling it, for the tenant whose admin asked for the consent URL."""
    if not services.gmail_oauth.configured:
        raise ApiError(503, _NOT_CONFIGURED)
    # Consumed atomically, and only by its own tenant: a replay finds it used, another
    # tenant's key finds nothing (and does not use it up).
    consumed = await services.pool.fetchval(
        "UPDATE oauth_states SET used_at = now() WHERE state = $1 AND provider = 'gmail'"
        " AND tenant_id = $2 AND used_at IS NULL AND expires_at > now() RETURNING 1",
        body.state,
        principal.tenant_id,
    )
    if consumed is None:
        raise ApiError(400, _STATE_REFUSED)
    try:
        tokens = await services.gmail_oauth.exchange(body.code)
    except MailboxRevoked as exc:
        raise ApiError(400, f"code: {exc}") from exc
    except GmailApiError as exc:
        # Google's outage, not the user's, and the code unspent: the state is theirs again,
        # so the same request tries again instead of starting over.
        await services.pool.execute(
            "UPDATE oauth_states SET used_at = NULL WHERE state = $1 AND provider = 'gmail'",
            body.state,
        )
        raise ApiError(502, f"Google did not answer; try again: {exc}") from exc
    except GmailNotConfigured as exc:
        raise ApiError(503, str(exc)) from exc
    try:
        mailbox = Mailbox(services.settings, tokens)
        email, history_id = await mailbox.profile()
    except MailboxRevoked as exc:
        raise ApiError(400, f"code: {exc}") from exc
    except GmailApiError as exc:
        raise ApiError(502, f"Gmail did not answer the profile request: {exc}") from exc
    except GmailNotConfigured as exc:
        raise ApiError(503, str(exc)) from exc
    integration_id = await services.gmail_store.connect(
        principal.tenant_id, email, mailbox.tokens, history_id
    )
    return {"status": "connected", "provider": "gmail", "account": email,
            "integration_id": integration_id}  # fmt: skip


@router.get("/api/integrations/status")
async def integrations_status(principal: PrincipalDep, services: ServicesDep) -> dict[str, Any]:
    now = datetime.now(UTC)
    rows = await services.gmail_store.status(principal.tenant_id)
    integrations: list[dict[str, Any]] = []
    for row in rows:
        last_success = row["last_success_at"]
        assert last_success is None or isinstance(last_success, datetime)
        integrations.append(
            {
                "provider": row["provider"],
                "account": row["account"],
                "connected": row["status"] == "connected",
                "status": row["status"],
                "last_successful_poll": last_success.isoformat() if last_success else None,
                "last_error": row["last_error"],
                # How old the newest mail we can be sure of having read is.
                "behind_seconds": round((now - last_success).total_seconds(), 1)
                if last_success
                else None,
            }
        )
    if not any(i["provider"] == "gmail" for i in integrations):
        integrations.append({"provider": "gmail", "account": None, "connected": False,
                             "status": "not_connected", "last_successful_poll": None,
                             "last_error": None, "behind_seconds": None})  # fmt: skip
    return {"integrations": integrations, "gmail_configured": services.gmail_oauth.configured}


class SendRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    lead_id: uuid.UUID | None = None
    to: EmailStr | None = None
    subject: str | None = Field(None, max_length=500)
    body: str = Field(min_length=1, max_length=100_000)
    reply_to_message_id: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _recipient(self) -> SendRequest:
        if self.lead_id is None and self.to is None:
            raise ValueError("give lead_id or to")
        return self


@router.post("/api/integrations/gmail/send", status_code=201, responses={404: {}, 409: {}, 502: {}})
async def send(body: SendRequest, principal: PrincipalDep, services: ServicesDep) -> dict[str, Any]:
    to = str(body.to) if body.to else None
    lead_id = str(body.lead_id) if body.lead_id else None
    if lead_id is not None:
        row = await services.pool.fetchrow(
            "SELECT channel, contact FROM leads WHERE lead_id = $1 AND tenant_id = $2",
            body.lead_id, principal.tenant_id,
        )  # fmt: skip
        lead: Mapping[str, Any] | None = dict(row) if row is not None else None
        if lead is None:
            # A lead whose first message the sink has not written yet is already in the
            # worker's sessions: a reply right after the message must not be a 404.
            try:
                session = await services.lead_state.session(lead_id)
            except StateUnavailable:
                session = None
            if session is not None and session["tenant_id"] == principal.tenant_id:
                lead = session
        if lead is None:
            raise ApiError(404, "lead_id: no such lead")
        if to is None:
            if lead["channel"] != "email":
                raise ApiError(409, f"lead_id: the lead is on {lead['channel']}, not e-mail")
            to = lead["contact"]
    assert to is not None
    try:
        sent = await services.email_sender.send(
            principal.tenant_id, to=to, body=body.body, lead_id=lead_id, subject=body.subject,
            reply_to_message_id=body.reply_to_message_id,
        )  # fmt: skip
    except NoMailbox as exc:
        raise ApiError(409, str(exc)) from exc
    except GmailNotConfigured as exc:
        raise ApiError(503, str(exc)) from exc
    except (MailboxRevoked, GmailApiError) as exc:
        raise ApiError(502, f"Gmail did not send the message: {exc}") from exc
    recorded = lead_id is not None
    if lead_id is not None:
        # The same event the worker's sender produces: the reply is in the lead's history and
        # stops its leak timer.
        command_id = str(uuid.uuid4())
        message = OutboundMessage(
            event_id=command_id, tenant_id=principal.tenant_id, occurred_at=datetime.now(UTC),
            lead_id=lead_id, command_id=command_id, attempt=1, channel="email",
            send_kind="freeform", status="accepted", channel_message_id=sent.gmail_message_id,
            text=body.body, sent_by="sdr",
        )  # fmt: skip
        try:
            await services.publisher.publish(
                services.topics.outbound_messages, lead_id.encode(),
                message.model_dump_json().encode(),
            )  # fmt: skip
        except PublishUnavailable as exc:
            # Sent: an error status would be retried by the client, and the lead mailed twice
            # (Gmail has no idempotency key). Said instead, and logged.
            logger.error("e-mail %s to lead %s sent but not recorded: %r",
                         sent.gmail_message_id, lead_id, exc)  # fmt: skip
            recorded = False
    return {"gmail_message_id": sent.gmail_message_id, "thread_id": sent.thread_id,
            "message_id": sent.rfc_message_id, "from": sent.sender, "to": sent.to,
            "recorded_in_lead_history": recorded}  # fmt: skip
