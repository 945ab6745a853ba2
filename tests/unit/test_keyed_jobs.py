"""Keyed jobs: keys at once up to the limit, one key's jobs in order, a failure stops the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from streams.keyed import KeyOrderedJobs


async def turns_until(condition: Callable[[], bool], turns: int = 1000) -> None:
    """Lets the loop run until `condition` holds (a bounded wait: a failing test ends)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


class Channel:
    """An outside service whose calls stay in flight until released."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()

    def send(self, lead: str, n: int) -> Callable[[], asyncio.Future[None]]:
        async def call() -> None:
            self.calls.append((lead, n))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await self.release.wait()
            self.in_flight -= 1

        return lambda: asyncio.ensure_future(call())


class Crashes:
    def __init__(self) -> None:
        self.reasons: list[BaseException] = []

    async def crash(self, reason: BaseException) -> None:
        self.reasons.append(reason)


async def test_different_keys_run_at_once_up_to_the_limit() -> None:
    channel = Channel()
    jobs = KeyOrderedJobs(4, on_failure=Crashes().crash)
    await _submit_all(jobs, [(f"lead-{n}", channel.send(f"lead-{n}", n)) for n in range(10)])
    await turns_until(lambda: channel.in_flight == 4)
    for _ in range(20):
        await asyncio.sleep(0)
    assert channel.in_flight == 4  # the fifth waits for a free slot
    channel.release.set()
    await jobs.wait_all()

    assert channel.most_in_flight == 4
    assert sorted(n for _, n in channel.calls) == list(range(10))


async def test_submit_waits_while_too_many_jobs_are_unfinished() -> None:
    channel = Channel()
    jobs = KeyOrderedJobs(1, on_failure=Crashes().crash)
    pending = KeyOrderedJobs.PENDING_PER_SLOT
    await _submit_all(jobs, [(f"lead-{n}", channel.send(f"lead-{n}", n)) for n in range(pending)])
    one_more = asyncio.create_task(jobs.submit("lead-x", channel.send("lead-x", pending)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not one_more.done()  # the agent reads no further
    channel.release.set()
    await one_more
    await jobs.wait_all()
    assert len(channel.calls) == pending + 1


async def test_a_key_with_many_jobs_queued_does_not_hold_the_other_keys() -> None:
    channel = Channel()
    jobs = KeyOrderedJobs(2, on_failure=Crashes().crash)
    await _submit_all(
        jobs,
        [*(("asha", channel.send("asha", n)) for n in range(5)), ("ravi", channel.send("ravi", 9))],
    )
    await turns_until(lambda: channel.in_flight == 2)
    # asha's later jobs wait for her first without a running slot: ravi's goes out meanwhile.
    assert channel.calls == [("asha", 0), ("ravi", 9)]
    channel.release.set()
    await jobs.wait_all()
    assert [n for lead, n in channel.calls if lead == "asha"] == [0, 1, 2, 3, 4]


async def test_one_keys_jobs_run_in_order_one_at_a_time() -> None:
    channel = Channel()
    jobs = KeyOrderedJobs(8, on_failure=Crashes().crash)
    await _submit_all(
        jobs,
        [
            ("asha", channel.send("asha", 1)),
            ("ravi", channel.send("ravi", 2)),
            ("asha", channel.send("asha", 3)),
            ("asha", channel.send("asha", 4)),
        ],
    )
    await turns_until(lambda: channel.in_flight == 2)
    for _ in range(20):
        await asyncio.sleep(0)
    # asha's first and ravi's only job are in flight; asha's next waits for her first.
    assert channel.calls == [("asha", 1), ("ravi", 2)]
    channel.release.set()
    await jobs.wait_all()

    assert [n for lead, n in channel.calls if lead == "asha"] == [1, 3, 4]
    assert channel.most_in_flight == 2


async def test_a_failure_stops_the_jobs_not_started_and_lets_running_ones_finish() -> None:
    channel = Channel()
    crashes = Crashes()
    jobs = KeyOrderedJobs(8, on_failure=crashes.crash)

    async def broken() -> None:
        raise RuntimeError("channel client bug")

    await jobs.submit("ravi", channel.send("ravi", 1))
    await jobs.submit("asha", broken)
    await jobs.submit("asha", channel.send("asha", 2))
    await turns_until(lambda: bool(crashes.reasons) and channel.in_flight == 1)
    assert channel.in_flight == 1  # ravi's send is not cancelled
    channel.release.set()
    await jobs.wait_all()

    assert [str(reason) for reason in crashes.reasons] == ["channel client bug"]
    assert channel.calls == [("ravi", 1)]  # asha's second never started
    assert channel.in_flight == 0  # ravi's send finished
    # From then on the agent submitting is held (the stopping worker cancels it): it must not
    # go on, or be restarted, and send what follows.
    held = asyncio.create_task(jobs.submit("kiran", channel.send("kiran", 3)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not held.done()
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert channel.calls == [("ravi", 1)]


async def _submit_all(
    jobs: KeyOrderedJobs, submissions: list[tuple[str, Callable[[], asyncio.Future[None]]]]
) -> None:
    for key, job in submissions:
        await jobs.submit(key, job)


async def test_a_stopping_worker_cancels_the_unfinished_jobs_and_hears_how_many_had_started() -> (
    None
):
    channel = Channel()
    jobs = KeyOrderedJobs(1, on_failure=Crashes().crash)
    await jobs.submit("ravi", channel.send("ravi", 1))
    await jobs.submit("ravi", channel.send("ravi", 2))  # waits for ravi's first
    await jobs.submit("asha", channel.send("asha", 1))  # waits for the one running slot
    await turns_until(lambda: channel.in_flight == 1)

    assert jobs.cancel_unfinished() == (3, 1)
    channel.release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert channel.calls == [("ravi", 1)]  # nothing started after the cancel
    await jobs.wait_all()  # nothing left unfinished
    assert jobs.cancel_unfinished() == (0, 0)
