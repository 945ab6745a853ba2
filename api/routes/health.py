"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers call them)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ServicesDep
from flexoraa.db import DB_ERRORS

router = APIRouter(tags=["health"])

_CHECK_TIMEOUT_S = 3.0


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "a dependency is unreachable"}})
async def ready(services: ServicesDep) -> JSONResponse:
    """Kafka and PostgreSQL are reachable; otherwise 503 naming what is not."""

    async def postgres() -> bool:
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT_S):
                await services.pool.fetchval("SELECT 1")
        except DB_ERRORS:
            return False
        return True

    async def kafka() -> bool:
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT_S):
                return await services.publisher.is_reachable()
        except TimeoutError:
            return False

    kafka_ok, postgres_ok = await asyncio.gather(kafka(), postgres())
    checks = {"kafka": kafka_ok, "postgres": postgres_ok}
    failing = [name for name, ok in checks.items() if not ok]
    if failing:
        return JSONResponse(
            {
                "status": "unavailable",
                "detail": f"unreachable: {', '.join(failing)}",
                "checks": checks,
            },
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/metrics", include_in_schema=False)
async def metrics(services: ServicesDep) -> Response:
    await services.sla_gauges.refresh()
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
