"""Typed dependencies: the process's services and the authenticated caller."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, Request
from starlette.types import Scope

from api.dedup import RecentIds
from api.errors import ApiError
from api.lead_state import LeadStateClient
from api.rate_limits import RateLimiter
from api.sla_gauges import SlaGauges
from api.tenants import Principal, PrincipalCache, find_principal
from connectors.channels import ChannelDirectory
from connectors.gmail import OAuthFlow
from connectors.gmail_send import EmailSender
from connectors.gmail_store import GmailStore
from connectors.razorpay import RazorpayGateway
from flexoraa.crypto import SecretBox
from flexoraa.db import DB_ERRORS
from flexoraa.kafka import EventPublisher
from flexoraa.latency import LatencyRecorder
from flexoraa.settings import Settings
from schemas.topics import TopicNames
from streams.rules.tokens import Pack


@dataclass
class Services:
    """Built once per process in the lifespan (the API's composition root)."""

    settings: Settings
    topics: TopicNames
    pool: asyncpg.Pool
    publisher: EventPublisher
    lead_state: LeadStateClient
    principals: PrincipalCache
    secret_box: SecretBox
    channels: ChannelDirectory
    recent_message_ids: RecentIds
    # SLA monitoring (issue 8): `latency.measure(operation, tenant_id=...)` times an operation.
    latency: LatencyRecorder
    sla_gauges: SlaGauges
    # Tokens (issue 6)
    razorpay: RazorpayGateway
    packs: dict[str, Pack]
    # Gmail (issue 7)
    rate_limiter: RateLimiter
    gmail_oauth: OAuthFlow
    gmail_store: GmailStore
    email_sender: EmailSender


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread hop
    # on every request for a dictionary lookup.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}

# A connector key is a channel bridge's: it brings customer messages in and can do nothing
# else (read leads, send as an SDR, change the roster), whoever it leaks to.
_CONNECTOR_REQUESTS = {("POST", "/api/events/inbound")}


def _connector_may(scope: Scope) -> bool:
    # The path within the app: under a root_path (a proxy's prefix) scope["path"] carries it.
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return (scope["method"], path) in _CONNECTOR_REQUESTS


def require_admin(principal: Principal) -> None:
    """Configuration (keys, channels' secrets, the SDR roster, mailboxes, buying tokens) is
    an admin key's; an SDR key works leads."""
    if principal.role != "admin":
        raise ApiError(403, "this needs an admin API key")


async def authenticate(request: Request, services: ServicesDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, api_key = header.partition(" ")
    if scheme.lower() != "bearer" or not api_key.strip():
        raise ApiError(
            401, "missing API key: send Authorization: Bearer <api key>",
            headers=_UNAUTHORIZED_HEADERS,
        )  # fmt: skip
    api_key = api_key.strip()
    principal = services.principals.get(api_key)
    if principal is None:
        source = request.client.host if request.client else "unknown"
        principal = await services.principals.once(
            api_key, source, lambda: _verify(services, api_key, source)
        )
    if principal.role == "connector" and not _connector_may(request.scope):
        raise ApiError(403, "a connector key can only post inbound events")
    # The metrics middleware attributes the request's latency event to this tenant.
    request.state.tenant_id = principal.tenant_id
    await services.rate_limiter.check_api_key(principal.key_id)
    return principal


async def _verify(services: Services, api_key: str, source: str) -> Principal:
    """The key's principal from PostgreSQL (cached), or the 401, 429 or 503 to answer."""
    # Behind a load balancer every client has its address: a key verified before (its cache
    # entry expired) must not be refused for someone else's guesses.
    guarded = (
        contextlib.nullcontext()
        if services.principals.verified_before(api_key)
        else services.rate_limiter.unverified_key_lookup(source)
    )
    async with guarded:
        try:
            principal = await find_principal(services.pool, api_key)
        except DB_ERRORS as exc:
            raise ApiError(503, "cannot verify the API key: database unavailable") from exc
        if principal is None:
            # Revoked on another replica (or by hand): no longer "verified before", so its
            # next tries count against the address like any unknown key.
            services.principals.forget(api_key)
            await services.rate_limiter.count_auth_failure(source)
            raise ApiError(401, "invalid or revoked API key", headers=_UNAUTHORIZED_HEADERS)
    services.principals.put(api_key, principal)
    return principal


async def limit_webhook(request: Request, services: ServicesDep) -> None:
    """Per sender address: a flood from one source cannot crowd out the others."""
    source = request.client.host if request.client else "unknown"
    await services.rate_limiter.check_webhook(source)


WebhookLimit = Depends(limit_webhook)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def authenticate_admin(principal: PrincipalDep) -> Principal:
    # A dependency, not a call in the handler: FastAPI validates the body before the
    # handler runs, and an SDR key's bad body must be a 403, not a 422 naming the fields.
    require_admin(principal)
    return principal


AdminDep = Annotated[Principal, Depends(authenticate_admin)]
