"""What an event may carry: values the rules and stores can work with, refused at decoding
(a dead letter) otherwise, never found out inside an agent or a timer at every restart.

A latency event's tenant id is a tenant's UUID, in its canonical text, or the platform's `-`;
times lie between 1970 and 2200; durations and token counts are finite and bounded."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.events import InboundMessage
from schemas.latency import MAX_DURATION_MS, NO_TENANT, LatencyEvent, is_tenant_ref
from schemas.tokens import MAX_TOKENS_PER_EVENT, TokenCredit, TokenUsage

TENANT = "5d1b8a52-3c4e-4f0a-9b7d-2e6f8c1a0b93"


def _event(tenant_id: str, duration_ms: float = 12.0) -> LatencyEvent:
    return LatencyEvent(
        event_id="e-1",
        tenant_id=tenant_id,
        occurred_at=datetime.now(UTC),
        operation="routing",
        duration_ms=duration_ms,
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
        "urn:uuid:5d1b8a52-3c4e-4f0a-9b7d-2e6f8c1a0b93",
        # A pattern's "$" also matches before a final newline.
        "5d1b8a52-3c4e-4f0a-9b7d-2e6f8c1a0b93\n",
        "-\n",
        "--",
        "",
    ],
)
def test_anything_else_is_refused_naming_the_field(tenant_id: str) -> None:
    with pytest.raises(ValidationError, match="tenant_id"):
        _event(tenant_id)
    assert not is_tenant_ref(tenant_id)


@pytest.mark.parametrize("duration_ms", [MAX_DURATION_MS + 1, float("inf"), float("nan")])
def test_a_duration_no_sketch_can_hold_is_refused(duration_ms: float) -> None:
    with pytest.raises(ValidationError, match="duration_ms"):
        _event(TENANT, duration_ms)


def test_a_duration_of_1e400_in_json_is_refused() -> None:
    raw = _event(TENANT).model_dump_json().replace('"duration_ms":12.0', '"duration_ms":1e400')
    with pytest.raises(ValidationError, match="duration_ms"):
        LatencyEvent.model_validate_json(raw)


def _inbound(occurred_at: str, received_at: str = "2026-12-04T10:00:00Z") -> str:
    return (
        f'{{"event_id": "e-1", "tenant_id": "{TENANT}", "occurred_at": "{occurred_at}",'
        f' "lead_id": "l-1", "channel": "sms", "contact": "555", "text": "hi",'
        f' "received_at": "{received_at}"}}'
    )


def test_times_from_1970_to_before_2200_are_accepted() -> None:
    for at in ("1970-01-01T00:00:00Z", "2199-12-31T23:59:59Z", "2026-12-04T10:00:00+05:30"):
        InboundMessage.model_validate_json(_inbound(at))


@pytest.mark.parametrize(
    "at", ["0001-01-01T00:00:00+14:00", "1969-12-31T23:59:59Z", "9999-12-31T23:59:59-14:00"]
)
def test_a_time_past_what_the_rules_can_add_days_to_is_refused(at: str) -> None:
    with pytest.raises(ValidationError, match="occurred_at"):
        InboundMessage.model_validate_json(_inbound(at))
    with pytest.raises(ValidationError, match="received_at"):
        InboundMessage.model_validate_json(_inbound("2026-12-04T10:00:00Z", at))


def test_token_counts_are_bounded() -> None:
    common = {"event_id": "e-1", "tenant_id": TENANT, "occurred_at": datetime.now(UTC)}
    TokenUsage(**common, feature="qualification", tokens=MAX_TOKENS_PER_EVENT)
    with pytest.raises(ValidationError, match="tokens"):
        TokenUsage(**common, feature="qualification", tokens=2**64)
    with pytest.raises(ValidationError, match="prompt_tokens"):
        TokenUsage(**common, feature="qualification", tokens=1, prompt_tokens=2**64)
    with pytest.raises(ValidationError, match="tokens"):
        TokenCredit(**common, source="purchase", reference="pay_1", tokens=10**20)
