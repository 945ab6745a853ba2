"""Records delivered to Faust's streams at once when nothing waits (streams.eager)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import warnings

import faust
import pytest

from streams.eager import STEP_IN_PLACE, Delivery, first_step
from streams.producer import AcknowledgedOnlyConsumer, WorkerApp

# From Python 3.12 deliveries take Faust's path (streams.eager), where a loop turn is expected.
in_place_only = pytest.mark.skipif(not STEP_IN_PLACE, reason="deliveries are stepped on 3.11 only")


def new_consumer() -> AcknowledgedOnlyConsumer:
    # No broker is reached: `wait_first` is in-memory work on the running loop.
    consumer = WorkerApp("eager-delivery-test", broker="kafka://127.0.0.1:1").consumer
    assert isinstance(consumer, AcknowledgedOnlyConsumer)
    return consumer


@in_place_only
async def test_a_delivery_that_does_not_wait_is_done_before_the_loop_turns() -> None:
    consumer = new_consumer()
    delivered: list[str] = []
    other_task_ran: list[bool] = []

    async def deliver() -> str:
        delivered.append("record")
        return "queued"

    asyncio.get_running_loop().call_soon(other_task_ran.append, True)
    results = await consumer.wait_first(Delivery(deliver()), consumer.suspend_flow.wait())

    assert delivered == ["record"]
    assert results.results == ["queued"]
    assert not results.stopped
    # Faust's path (a task per awaitable, asyncio.wait) lets the loop run the others first.
    assert other_task_ran == []


async def test_a_delivery_that_waits_finishes_once_what_it_waits_for_is_there() -> None:
    consumer = new_consumer()
    room = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def deliver() -> str:
        steps.append("started")
        await room  # a full stream buffer
        steps.append("put")
        return "queued"

    delivery = Delivery(deliver())
    waiting = asyncio.ensure_future(consumer.wait_first(delivery, consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    assert steps == ["started"]
    assert not waiting.done()
    room.set_result(None)
    results = await waiting
    assert steps == ["started", "put"]
    assert results.results == ["queued"]
    assert results.done == [delivery]


async def test_a_waiting_delivery_is_abandoned_when_the_flow_is_suspended() -> None:
    # A rebalance: Faust's fetch loop must not stay blocked on a full buffer.
    consumer = new_consumer()
    consumer.suspend_flow.clear()
    seen: list[str] = []

    async def deliver() -> None:
        try:
            await asyncio.get_running_loop().create_future()  # never room
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    suspended = consumer.suspend_flow.wait()
    waiting = asyncio.ensure_future(consumer.wait_first(Delivery(deliver()), suspended))
    await asyncio.sleep(0.01)
    consumer.suspend_flow.set()
    results = await asyncio.wait_for(waiting, 1)
    await asyncio.sleep(0)  # the abandoned delivery's cancellation runs
    assert results.done == [suspended]
    assert seen == ["cancelled"]


async def test_a_failing_delivery_raises_and_leaves_no_unawaited_coroutine() -> None:
    consumer = new_consumer()

    async def deliver() -> None:
        raise ValueError("undecodable")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="undecodable"):
            await consumer.wait_first(Delivery(deliver()), consumer.suspend_flow.wait())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


async def test_an_error_of_what_a_delivery_waited_for_reaches_it() -> None:
    failed = asyncio.get_running_loop().create_future()

    async def deliver() -> str:
        try:
            await failed
        except KeyError:
            return "handled"
        return "not reached"

    finished, rest = first_step(Delivery(deliver()))
    assert not finished
    failed.set_exception(KeyError("gone"))
    assert await rest == "handled"


async def test_when_the_flow_is_suspended_deliveries_take_fausts_path() -> None:
    consumer = new_consumer()
    consumer.suspend_flow.set()
    other_task_ran: list[bool] = []

    async def deliver() -> str:
        return "queued"

    asyncio.get_running_loop().call_soon(other_task_ran.append, True)
    results = await consumer.wait_first(Delivery(deliver()), consumer.suspend_flow.wait())
    assert other_task_ran == [True]
    assert not results.stopped


def test_the_consumer_marks_the_deliveries_of_its_callback() -> None:
    consumer = new_consumer()
    message = faust.types.Message(
        topic="t", partition=0, offset=1, timestamp=0.0, timestamp_type=0, headers=[],
        key=b"k", value=b"v", checksum=None,
    )  # fmt: skip
    delivery = consumer.callback(message)
    assert isinstance(delivery, Delivery)
    delivery.awaitable.close()  # type: ignore[attr-defined]


async def test_a_timed_wait_in_the_first_step_does_not_cancel_the_fetch_loop() -> None:
    # Faust's producer buffer, over its limit, waits with `wait_for(..., timeout=0.1)` while a
    # record is being delivered; the fetch loop (the task calling `wait_first`) must go on.
    consumer = new_consumer()

    async def deliver() -> str:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().create_future(), 0.02)
        except TimeoutError:
            return "flushed what it could"
        return "not reached"

    results = await consumer.wait_first(Delivery(deliver()), consumer.suspend_flow.wait())
    assert results.results == ["flushed what it could"]
    await asyncio.sleep(0.05)  # a cancellation aimed at this task would land here


_marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="fetch loop")


async def test_a_delivery_keeps_its_context_variables_to_itself() -> None:
    consumer = new_consumer()
    room = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def deliver() -> None:
        token = _marker.set("delivery")
        await room  # suspends: the rest runs in the task wait_first makes
        seen.append(_marker.get())
        _marker.reset(token)  # a token of another context would raise here

    async def deliver_at_once() -> None:
        _marker.set("delivery")

    await consumer.wait_first(Delivery(deliver_at_once()), consumer.suspend_flow.wait())
    assert _marker.get() == "fetch loop"
    waiting = asyncio.ensure_future(
        consumer.wait_first(Delivery(deliver()), consumer.suspend_flow.wait())
    )
    await asyncio.sleep(0.01)
    room.set_result(None)
    await waiting
    assert seen == ["delivery"]
    assert _marker.get() == "fetch loop"
