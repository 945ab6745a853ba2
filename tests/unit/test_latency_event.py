"""A latency event's tenant id is a tenant's UUID, in its canonical text, or the platform's `-`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.latency import NO_TENANT, LatencyEvent


def _event(tenant_id: str) -> LatencyEvent:
    return LatencyEvent(
        event_id="e-1",
        tenant_id=tenant_id,
        occurred_at=datetime.now(UTC),
        operation="routing",
        duration_ms=12.0,
        outcome="ok",
    )


def test_a_tenants_uuid_and_the_platform_are_accepted() -> None:
    tenant = str(uuid.uuid4())
    assert _event(tenant).tenant_id == tenant
    assert _event(NO_TENANT).tenant_id == NO_TENANT


@pytest.mark.parametrize(
    "tenant_id",
    [
        "tenant-1",
        "latency-5d1b8a52",
        # Another spelling of a UUID would key a second set of the tenant's SLA windows.
        "5D1B8A52-3C4E-4F0A-9B7D-2E6F8C1A0B93",
        "5d1b8a523c4e4f0a9b7d2e6f8c1a0b93",
        "{5d1b8a52-3c4e-4f0a-9b7d-2e6f8c1a0b93}",
        "",
    ],
)
def test_anything_else_is_refused_naming_the_field(tenant_id: str) -> None:
    with pytest.raises(ValidationError, match="tenant_id"):
        _event(tenant_id)
