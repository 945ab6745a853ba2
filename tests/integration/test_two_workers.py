"""Two workers share the partitions; the API reads any lead through either of them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from flexoraa.settings import Settings
from tests.conftest import (
    MakeTenant,
    ManagedProcess,
    StartProcess,
    http_get_json,
    start_worker,
    wait_until,
)
from tests.integration.conftest import ApiFactory
from tests.integration.test_pipeline import lead_state, post

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workers(processes: StartProcess, test_settings: Settings) -> list[ManagedProcess]:
    first = start_worker(processes, test_settings, name="worker-a", ENABLE_AI_QUALIFICATION="false")
    second = start_worker(
        processes, test_settings, name="worker-b", ENABLE_AI_QUALIFICATION="false"
    )
    urls = {f"http://127.0.0.1:{w.ports['web']}" for w in (first, second)}

    def both_own_partitions() -> bool:
        for worker in (first, second):
            status, metadata = http_get_json(f"http://127.0.0.1:{worker.ports['web']}/router/")
            if status != 200 or not isinstance(metadata, dict):
                return False
            owners = {url.rstrip("/") for url, tables in metadata.items() if any(tables.values())}
            if owners != urls:
                return False
            if http_get_json(f"http://127.0.0.1:{worker.ports['web']}/ready")[0] != 200:
                return False
        return True

    wait_until(both_own_partitions, 120, "both workers to own partitions after the rebalance")
    return [first, second]


@pytest.fixture
async def api_via_first_worker(
    api_factory: ApiFactory, workers: list[ManagedProcess]
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory(worker_url=f"http://127.0.0.1:{workers[0].ports['web']}") as client:
        yield client


async def test_every_lead_is_readable_through_one_worker(
    api_via_first_worker: httpx.AsyncClient,
    make_tenant: MakeTenant,
    workers: list[ManagedProcess],
) -> None:
    tenant = await make_tenant()
    lead_ids = [
        (await post(api_via_first_worker, tenant, channel="sms", contact=f"555100{i:04d}",
                    text=f"hello {i}"))["lead_id"]
        for i in range(40)
    ]  # fmt: skip
    for lead_id in lead_ids:
        state = await lead_state(api_via_first_worker, tenant, lead_id, 1)
        assert state["lead_id"] == lead_id
    # The leads really are spread: the second worker owns some of their partitions.
    status, metadata = http_get_json(f"http://127.0.0.1:{workers[1].ports['web']}/router/")
    assert status == 200
    assert isinstance(metadata, dict)
    assert all(any(tables.values()) for tables in metadata.values())
