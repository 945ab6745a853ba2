"""SLA windows moving to a second worker: the windows it takes over count on from what the
first worker counted (restored from their changelog), so the minutes stored in PostgreSQL
hold every call exactly once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any, get_args

import asyncpg
import pytest

from flexoraa.kafka import partition_of
from flexoraa.settings import Settings
from schemas.latency import LatencyEvent, Operation
from tests.conftest import (
    MakeTenant,
    ManagedProcess,
    StartProcess,
    http_get_json,
    start_worker,
    wait_until,
)
from tests.integration.test_pipeline import eventually
from tests.integration.test_sla import SLA_ENV, produce

pytestmark = pytest.mark.integration

OPERATIONS: tuple[Operation, ...] = get_args(Operation)
SLA_CHANGELOG = "sla_windows-changelog"


@pytest.fixture(scope="module")
def first(processes: StartProcess, test_settings: Settings) -> ManagedProcess:
    return start_worker(
        processes, test_settings, "sla-first", None, ENABLE_AI_QUALIFICATION="false", **SLA_ENV
    )


def owned_windows(worker: ManagedProcess) -> set[int] | None:
    """The SLA table's partitions the worker serves, by its router (None: not answering)."""
    url = f"http://127.0.0.1:{worker.ports['web']}"
    status, metadata = http_get_json(f"{url}/router/")
    if status != 200 or not isinstance(metadata, dict):
        return None
    # {worker URL: {changelog topic: partitions}}
    return {
        partition
        for owner, changelogs in metadata.items()
        if owner.rstrip("/") == url
        for changelog, partitions in changelogs.items()
        if changelog.endswith(SLA_CHANGELOG)
        for partition in partitions
    }


async def stored_calls(db: asyncpg.Connection, tenant_id: str) -> dict[tuple[str, datetime], int]:
    rows = await db.fetch(
        "SELECT operation, minute, calls FROM sla_metrics WHERE tenant_key = $1", tenant_id
    )
    return {(row["operation"], row["minute"]): row["calls"] for row in rows}


def latency_at(tenant_id: str, operation: Operation, at: datetime) -> bytes:
    event = LatencyEvent(event_id=str(uuid.uuid4()), tenant_id=tenant_id, occurred_at=at,
                         operation=operation, duration_ms=50.0, outcome="ok")  # fmt: skip
    return event.model_dump_json().encode()


async def test_windows_moved_to_a_second_worker_count_on_from_the_first(
    first: ManagedProcess,
    processes: StartProcess,
    test_settings: Settings,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = (await make_tenant("Moving windows")).tenant_id
    # Every call in one minute, before the move and after it: the moved windows must carry
    # the first worker's calls on (a window started afresh would be a row of 10, not 30).
    at = datetime.now(UTC)
    minute = at.replace(second=0, microsecond=0)

    async def send(calls_each: int) -> None:
        await produce(test_settings, [
            (operation.encode(), latency_at(tenant, operation, at))
            for operation in OPERATIONS
            for _ in range(calls_each)
        ])  # fmt: skip

    def stored(calls_each: int) -> Any:
        async def check() -> bool:
            expected = {(operation, minute): calls_each for operation in OPERATIONS}
            return await stored_calls(db, tenant) == expected

        return check

    await send(20)
    await eventually(stored(20), what="20 calls of each operation stored by the first worker")

    second = start_worker(
        processes, test_settings, "sla-second", None, ENABLE_AI_QUALIFICATION="false", **SLA_ENV
    )

    def both_serve_windows() -> bool:
        owned = [owned_windows(worker) for worker in (first, second)]
        ready = all(
            http_get_json(f"http://127.0.0.1:{w.ports['web']}/ready")[0] == 200
            for w in (first, second)
        )
        return ready and all(owned) and not (owned[0] or set()) & (owned[1] or set())

    wait_until(both_serve_windows, 120, "both workers to serve SLA windows after the rebalance")
    taken = owned_windows(second) or set()
    moved = [op for op in OPERATIONS if partition_of(op.encode(), test_settings.kafka_partitions)
             in taken]  # fmt: skip
    # Five operations on five partitions, four of eight per worker: some always move.
    assert moved

    await send(10)
    await eventually(stored(30), what="30 calls of each operation stored after the move")
    await asyncio.sleep(2)  # four more evaluations: nothing counted twice
    assert await stored_calls(db, tenant) == {(operation, minute): 30 for operation in OPERATIONS}
