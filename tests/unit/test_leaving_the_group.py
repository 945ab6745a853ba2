"""What a worker does as its partitions leave it: the revocation signal goes out while they are
still its own (a rebalance while it stops), and not once the coordinator has dropped it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from faust.types import TP

from streams.producer import AcknowledgedOnlyConsumer, WorkerApp


async def test_a_rebalance_while_stopping_sends_the_revocation_signal_once() -> None:
    # Faust leaves the group at once then, without the signal: what its receivers save as
    # partitions leave (the SLA windows) was lost, or written at shutdown over the newer
    # copies of the worker that had taken the partitions.
    app = WorkerApp("leaving", broker="kafka://127.0.0.1:1")
    signalled: list[set[TP]] = []
    left: list[bool] = []

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def record(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        signalled.append(set(revoked))

    app._on_rebalance_when_stopped = lambda: left.append(True)  # type: ignore[method-assign]
    app._stopped.set()
    assignment = {TP("flexoraa.latency", 3)}
    await app._on_partitions_revoked(assignment)
    await app._on_partitions_revoked(assignment)  # a second rebalance before it stopped
    assert signalled == [assignment]
    assert left == [True, True]
    assert app.left_group_stopping


def _consumer_of_generation(generation: int) -> AcknowledgedOnlyConsumer:
    coordinator = SimpleNamespace(generation=generation)
    thread = SimpleNamespace(_consumer=SimpleNamespace(_coordinator=coordinator))
    return cast(AcknowledgedOnlyConsumer, SimpleNamespace(_thread=thread))


def test_a_consumer_the_coordinator_dropped_is_no_member() -> None:
    # aiokafka resets the generation to -1 when the coordinator no longer knows the member,
    # and then revokes the partitions it had: another worker's by then.
    assert AcknowledgedOnlyConsumer.still_a_member(_consumer_of_generation(7))
    assert not AcknowledgedOnlyConsumer.still_a_member(_consumer_of_generation(-1))


async def test_a_stopping_worker_leaves_the_group_even_if_a_receiver_fails() -> None:
    app = WorkerApp("leaving-failing", broker="kafka://127.0.0.1:1")
    left: list[bool] = []

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def fail(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        raise RuntimeError("flush failed")

    app._on_rebalance_when_stopped = lambda: left.append(True)  # type: ignore[method-assign]
    app._stopped.set()
    with pytest.raises(RuntimeError):
        await app._on_partitions_revoked({TP("flexoraa.latency", 3)})
    assert left == [True]
