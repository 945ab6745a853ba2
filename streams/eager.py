"""A record's delivery to Faust's streams, run at once as far as it goes without waiting.

Faust's fetch loop hands each record of its streams' topics to the conductor through
`Service.wait_first(callback(message), suspend_flow.wait())`, so that a rebalance can abandon
a delivery blocked on a full stream buffer. That makes four futures per record and always a
turn of the event loop, in which every other ready task runs first: at 1,000 messages/s the
loop went around once per outbound command, the fetch loop took 24 ms per fetch to deliver its
25 commands, and each inbound message waited that long in aiokafka's buffer before its next
fetch was dispatched (p50 30-60 ms from the API's 202 to the session, bench.freshness).

A delivery almost never waits (it waits for flow control during a rebalance, for Faust's
producer buffer, or for a full stream buffer), so its first step is run here: done, it cost no
future and no turn; waiting, the rest goes through `wait_first` as before, abandoned as before
when the flow is suspended. Each delivery runs in a context of its own, as in a task of its own.

Unlike a task of its own, the first step runs while the fetch loop's task is the current task:
whatever acts on the current task there (`asyncio.timeout`, `timeout_at`, a `TaskGroup`) would
act on the fetch loop, a timeout cancelling it. What a delivery runs is Faust's conductor
(`on_message`: flow control, its lock, decoding, the stream queues) and, when Faust's producer
buffer is over its limit, its flush, which waits with `asyncio.wait_for`: on Python 3.11 that
runs the wait as a task of its own and none of it uses the current task. From 3.12 `wait_for`
is built on `asyncio.timeout`, so deliveries are run in place on 3.11 only (`STEP_IN_PLACE`);
a later Python would start them as eager tasks (3.12's `eager_start`) instead.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from collections.abc import Awaitable, Callable, Generator
from typing import Any

STEP_IN_PLACE = sys.version_info < (3, 12)


class Delivery:
    """A record's delivery coroutine, marked so that the consumer's `wait_first` knows it."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable

    def __await__(self) -> Generator[Any, None, Any]:
        return self.awaitable.__await__()


def marking_deliveries(callback: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Delivery]:
    """Faust's consumer callback (the conductor's `on_message`), its coroutines marked."""

    def deliver(message: Any) -> Delivery:
        return Delivery(callback(message))

    return deliver


class Resumed:
    """An awaitable continuing a coroutine whose first step already ran (in `context`) and
    waits on `waiting_on`: the task awaiting it waits on that in its place, then every value,
    result and exception (a cancellation too) passes through, as `yield from` would pass them,
    each step run in the same context as the first.

    It must be awaited (by a task that runs it at once, as `wait_first`'s does): left alone,
    the coroutine stays suspended half way, with whatever it held (a lock's turn) held."""

    __slots__ = ("context", "coroutine", "waiting_on")

    def __init__(self, coroutine: Any, waiting_on: Any, context: contextvars.Context) -> None:
        self.coroutine = coroutine
        self.waiting_on = waiting_on
        self.context = context

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, waiting_on, run = self.coroutine, self.waiting_on, self.context.run
        while True:
            try:
                sent = yield waiting_on
            # Thrown in by the awaiting task (a cancellation too): the coroutine's to handle.
            except BaseException as exc:  # noqa: BLE001
                try:
                    waiting_on = run(coroutine.throw, exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    waiting_on = run(coroutine.send, sent)
                except StopIteration as done:
                    return done.value


Step = tuple[bool, Any]


def first_step(delivery: Delivery) -> Step:
    """Runs the delivery until it first waits: (True, its result) when it finished, (False,
    a `Resumed` to await for the rest) when it waits. Its exception propagates. Anything but a
    coroutine (which cannot be stepped) is left to await whole: (False, the awaitable)."""
    coroutine = delivery.awaitable
    if not inspect.iscoroutine(coroutine):
        return False, coroutine
    # Its own context, as a task's: what it sets stays its own, in every step.
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(coroutine.send, None)
    except StopIteration as done:
        return True, done.value
    return False, Resumed(coroutine, waiting_on, context)
