"""The WhatsApp send loop: retries 429/5xx and requests that never left up to the maximum,
never a request whose answer was lost, falls back to the template on Meta's 131047 without
spending an attempt, and always ends with a final report."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from connectors.whatsapp import UNCONFIRMED_ERROR, GraphApiClient, GraphApiError
from flexoraa.settings import Settings
from schemas.latency import LatencyEvent
from schemas.messaging import OutboundCommand, OutboundMessage
from streams.agents.outbound import Sender, SentCommands
from tests.conftest import free_port
from tests.fakes.graph_api import GraphApiFake

TENANT = str(uuid.uuid4())
LEAD = str(uuid.uuid4())


@dataclass
class Reports:
    sent: list[OutboundMessage] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append(OutboundMessage.model_validate_json(value))


@dataclass
class Latency:
    outcomes: list[str] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.outcomes.append(LatencyEvent.model_validate_json(value).outcome)


@dataclass
class Graph:
    """Fails each free-form call with the next error; templates go through."""

    errors: list[GraphApiError]
    calls: list[str] = field(default_factory=list)

    async def send_whatsapp_text(self, *args: Any) -> str:
        self.calls.append("freeform")
        if self.errors:
            raise self.errors.pop(0)
        return "wamid.F"

    async def send_whatsapp_template(self, *args: Any) -> str:
        self.calls.append("template")
        return "wamid.T"


@dataclass(frozen=True)
class Channel:
    kind: str = "whatsapp"
    external_id: str = "1555000"
    access_token: str = "EAAG"


def outside_window() -> GraphApiError:
    return GraphApiError(400, "131047", "Re-engagement message")


def server_error() -> GraphApiError:
    return GraphApiError(500, None, "oops")


async def send(max_attempts: int, errors: list[GraphApiError]) -> tuple[list[str], list[str]]:
    graph = Graph(errors)
    reports = await send_through(graph, max_attempts)
    return graph.calls, [report.status for report in reports]


async def send_through(
    graph: Any, max_attempts: int, latency: Latency | None = None
) -> list[OutboundMessage]:
    """One SDR reply through the send loop, inside the 24-hour window: its reports."""
    settings = Settings(
        whatsapp_template_name="cold_recovery",
        whatsapp_send_max_attempts=max_attempts,
        whatsapp_send_backoff_ms=0,
    )
    reports = Reports()
    sender = Sender(settings, cast(Any, graph), cast(Any, None), cast(Any, reports),
                    cast(Any, latency or Latency()), cast(Any, None),
                    SentCommands(cast(Any, {})))  # fmt: skip

    async def channel(*args: Any) -> Channel:
        return Channel()

    sender._channel_for = channel  # type: ignore[method-assign,assignment]
    command = OutboundCommand(event_id=str(uuid.uuid4()), tenant_id=TENANT,
                              occurred_at=datetime.now(UTC), lead_id=LEAD, text="hi",
                              sent_by="sdr")  # fmt: skip
    # Inside the window by our clock; Meta's says otherwise (131047).
    session = {
        "tenant_id": TENANT, "channel": "whatsapp", "contact": "919800000001",
        "contact_name": "Asha", "last_customer_message_ms": int(time.time() * 1000) - 60_000,
    }  # fmt: skip
    await sender.send(command, session)
    return reports.sent


@pytest.mark.parametrize(
    ("max_attempts", "errors"),
    [(1, [outside_window()]), (4, [*[server_error() for _ in range(3)], outside_window()])],
    ids=["only-attempt", "last-attempt"],
)  # fmt: skip
async def test_a_131047_on_the_last_attempt_still_falls_back_to_the_template(
    max_attempts: int, errors: list[GraphApiError]
) -> None:
    # The fallback used up an attempt: on the last one the loop ended after "retrying", the
    # message never went, and no final report said so.
    calls, statuses = await send(max_attempts, errors)
    assert calls[-1] == "template"
    assert statuses[-1] == "accepted"


async def test_retries_stop_at_the_maximum_with_a_final_failure() -> None:
    calls, statuses = await send(3, [server_error() for _ in range(5)])
    assert calls == ["freeform"] * 3
    assert statuses == ["retrying", "retrying", "failed"]


async def test_a_send_whose_answer_is_lost_is_reported_unconfirmed_and_not_sent_again() -> None:
    # Meta took the request and its answer never came: sent again, the lead got it twice.
    meta = GraphApiFake(answer_after_s=1.0)
    await meta.start(free_port())
    graph = GraphApiClient(meta.url, meta.version, timeout_s=0.2)
    try:
        reports = await send_through(graph, max_attempts=3)
    finally:
        await graph.close()
        await meta.stop()
    assert len(meta.requests) == 1
    assert [(r.status, r.error_code) for r in reports] == [("failed", UNCONFIRMED_ERROR)]


async def test_a_request_that_could_not_connect_is_tried_again() -> None:
    graph = GraphApiClient(f"http://127.0.0.1:{free_port()}", "v21.0", timeout_s=0.2)
    try:
        reports = await send_through(graph, max_attempts=3)
    finally:
        await graph.close()
    assert [r.status for r in reports] == ["retrying", "retrying", "failed"]
    assert reports[-1].error_code is not None
    assert reports[-1].error_code != UNCONFIRMED_ERROR


async def test_a_successful_send_is_a_measured_call_too() -> None:
    # Only failures were measured: one retried 503 among a thousand good sends was an error
    # rate of 100 % for the outbound SLA.
    latency = Latency()
    reports = await send_through(Graph([server_error()]), max_attempts=3, latency=latency)
    assert [r.status for r in reports] == ["retrying", "accepted"]
    assert latency.outcomes == ["error", "ok"]
