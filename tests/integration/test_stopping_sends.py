"""A worker stopping while a send hangs: the send is ended and reported, not dropped half way
by the closing loop, and the next worker sends the command again (nothing lost)."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator

import pytest

from flexoraa.kafka import delete_topics, ensure_topics
from flexoraa.settings import Settings
from tests.conftest import MakeTenant, ManagedProcess, StartProcess, start_worker
from tests.fakes.graph_api import GraphApiFake
from tests.integration.conftest import ApiFactory
from tests.integration.test_pipeline import eventually
from tests.integration.test_whatsapp import inbound, now_s, outbound_rows, register, reply

pytestmark = pytest.mark.integration

# The hung call outlives the drain by far, and ends before the module's Graph API fake stops.
HUNG_CALL_S = 15.0


@pytest.fixture
async def test_settings(test_settings: Settings) -> AsyncIterator[Settings]:
    """Topics (so a consumer group) of this test's own: no other worker shares its partitions."""
    own = test_settings.model_copy(
        update={"topic_prefix": f"{test_settings.topic_prefix}-{uuid.uuid4().hex[:6]}"}
    )
    await ensure_topics(own)
    yield own
    await delete_topics(own)


async def test_a_send_hanging_past_the_drain_is_stopped_reported_and_sent_again_after_restart(
    processes: StartProcess,
    test_settings: Settings,
    api_factory: ApiFactory,
    make_tenant: MakeTenant,
    graph: GraphApiFake,
) -> None:
    def worker(name: str) -> ManagedProcess:
        return start_worker(
            processes,
            test_settings,
            name,
            WHATSAPP_GRAPH_API_URL=graph.url,
            WORKER_SHUTDOWN_DRAIN_S="1",
            ENABLE_AI_QUALIFICATION="false",
        )

    first = worker("stopping-sends-a")
    async with api_factory(
        topic_prefix=test_settings.topic_prefix,
        worker_url=f"http://127.0.0.1:{first.ports['web']}",
    ) as api:
        business = await register(api, await make_tenant())
        lead_id = await inbound(api, business, "919844499001", now_s() - 60, "wamid.STOP1")
        graph.answer_after_s = HUNG_CALL_S
        try:
            await reply(api, business, lead_id, "Still there?")

            async def hanging() -> bool:
                return graph.in_flight == 1

            await eventually(hanging, what="the send to hang at the Graph API")
            assert first.stop(signal.SIGTERM, timeout_s=HUNG_CALL_S - 5) == 0
        finally:
            graph.answer_after_s = 0.0
        assert "stopped 1 unfinished sends, 1 of them in progress" in first.log_path.read_text()

    second = worker("stopping-sends-b")
    async with api_factory(
        topic_prefix=test_settings.topic_prefix,
        worker_url=f"http://127.0.0.1:{second.ports['web']}",
    ) as api:
        (row,) = await outbound_rows(api, business, lead_id)
        assert row["status"] == "accepted"
    # The hung call reached the Graph API before the stop; the command went out again.
    assert [r["body"]["text"]["body"] for r in graph.sent_to(business.phone_number_id)] == [
        "Still there?",
        "Still there?",
    ]
