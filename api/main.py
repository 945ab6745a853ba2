"""The API's composition root: `create_app(settings)` builds every client in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from api import errors
from api.dedup import RecentIds
from api.deps import Services
from api.direct import DirectRoutes
from api.lead_state import LeadStateClient
from api.middleware import BodyLimitMiddleware, MetricsMiddleware
from api.payments import run_capture_sweeps
from api.rate_limits import RateLimiter
from api.routes import (
    admin,
    channels,
    dead_letters,
    events,
    gmail,
    health,
    leads,
    leakage,
    meta_webhooks,
    monitoring,
    notifications,
    sdrs,
    tokens,
)
from api.sla_gauges import SlaGauges
from api.tenants import PrincipalCache
from connectors.channels import ChannelDirectory
from connectors.gmail import OAuthFlow
from connectors.gmail_send import EmailSender
from connectors.gmail_store import GmailStore
from connectors.razorpay import RazorpayGateway
from flexoraa.crypto import load_secret_box
from flexoraa.db import create_pool
from flexoraa.kafka import EventPublisher
from flexoraa.latency import LatencyRecorder
from flexoraa.runtime import settle_collector, time_garbage_collections, watch_loop_lag
from flexoraa.settings import Settings
from schemas.topics import TopicNames
from streams.agents.sla_store import SlaStore
from streams.rules.tokens import parse_packs

SHUTDOWN_STEP_S = 5.0


def _constant(pool: asyncpg.Pool) -> Callable[[], Awaitable[asyncpg.Pool]]:
    async def factory() -> asyncpg.Pool:
        return pool

    return factory


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(settings)
        publisher = EventPublisher(settings)
        lead_state = LeadStateClient(settings.worker_url)
        secret_box = load_secret_box(settings)
        gmail_store = GmailStore(_constant(pool), secret_box)
        razorpay = RazorpayGateway(settings)
        app.state.services = Services(
            settings=settings,
            topics=TopicNames(settings.topic_prefix),
            pool=pool,
            publisher=publisher,
            lead_state=lead_state,
            principals=PrincipalCache(settings.api_key_cache_ttl_s),
            secret_box=secret_box,
            channels=ChannelDirectory(_constant(pool), secret_box),
            recent_message_ids=RecentIds(settings.webhook_dedup_cache_size),
            latency=latency,
            sla_gauges=SlaGauges(SlaStore(_constant(pool)), settings.sla_gauge_refresh_s),
            razorpay=razorpay,
            packs=parse_packs(settings.token_packs, settings.payment_currency),
            rate_limiter=RateLimiter(
                settings.api_rate_limit,
                settings.webhook_rate_limit,
                settings.auth_failure_rate_limit,
            ),
            gmail_oauth=OAuthFlow(settings),
            gmail_store=gmail_store,
            email_sender=EmailSender(settings, gmail_store),
        )
        await latency.start()
        time_garbage_collections()
        loop_lag = asyncio.create_task(watch_loop_lag(), name="loop-lag")
        background = [loop_lag]
        if razorpay.configured and settings.razorpay_capture_sweep_s > 0:
            sweeps = run_capture_sweeps(
                pool,
                razorpay,
                interval_s=settings.razorpay_capture_sweep_s,
                older_than_s=settings.razorpay_capture_after_s,
            )
            background.append(asyncio.create_task(sweeps, name="capture-sweep"))
        # Everything allocated so far lives as long as the process.
        settle_collector(settings.gc_gen0_threshold)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            # A sweep cancelled mid-call gives its connection back before the pool closes.
            await asyncio.wait(background, timeout=SHUTDOWN_STEP_S)
            # Each step bounded: a shutdown that hangs (a broker or database that stopped
            # answering) would keep the process from exiting at all.
            for step in (latency.close(), publisher.close(), lead_state.close()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(step, SHUTDOWN_STEP_S)
            try:
                await asyncio.wait_for(pool.close(), SHUTDOWN_STEP_S)
            except TimeoutError:
                pool.terminate()

    app = FastAPI(
        title="Flexoraa Streams API",
        version="0.1.0",
        description="Leads, messages and live pipeline state. Authenticate with "
        "`Authorization: Bearer <api key>`.",
        lifespan=lifespan,
        # The API's metrics are Prometheus's (api.middleware.MetricsMiddleware), and nothing
        # here exports OpenTelemetry. FastAPI's native telemetry, on by default, still asks
        # OpenTelemetry's global providers on every request whether any is configured: 2 % of
        # the API's CPU at 1,000 messages a second (py-spy, bench.freshness).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(events.router)
    app.include_router(leads.router)
    app.include_router(admin.router)
    app.include_router(dead_letters.router)
    # --- WhatsApp and Meta channels (issue 3) ---
    app.include_router(channels.router)
    app.include_router(meta_webhooks.router)
    # --- AI qualification (issue 4) ---
    app.include_router(sdrs.router)
    # --- Leakage prevention (issue 5) ---
    app.include_router(leakage.router)
    # --- Tokens and Razorpay (issue 6) ---
    app.include_router(notifications.router)
    app.include_router(tokens.router)
    # --- Gmail (issue 7) ---
    app.include_router(gmail.router)
    # --- SLA monitoring (issue 8) ---
    app.include_router(monitoring.router)
    # Built here (no I/O until the lifespan starts it) so the middleware can hold it.
    latency = LatencyRecorder(settings, TopicNames(settings.topic_prefix).latency)
    # Innermost of ours (added first): the body limit and the metrics still apply to it.
    app.add_middleware(
        DirectRoutes,
        routes=[
            _route(events.router, "POST", events.INBOUND_PATH),
            _route(leads.router, "GET", leads.LEAD_PATH),
        ],
        declared=app.routes,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.request_body_timeout_s,
    )
    app.add_middleware(MetricsMiddleware, latency=latency)
    return app


def _route(router: APIRouter, method: str, path: str) -> APIRoute:
    # The router's own routes: FastAPI keeps an included router whole, not its routes.
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path == path and method in (route.methods or ()):
            return route
    raise LookupError(f"no route {method} {path}")
