"""Jobs run concurrently across keys and in order within a key (the outbound agent's sends).

One at a time, a 200 ms Graph API call capped a worker at five sends a second, and a lead's
retry backoff held every other lead's message. A lead's messages must still go out in the order
they were asked for, so a job starts only once its key's previous job is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class KeyOrderedJobs:
    """At most `limit` jobs running at once, the jobs of one key one after another in the
    order submitted; `submit` waits while `PENDING_PER_SLOT * limit` jobs are unfinished.

    A job waiting for its key's previous one holds no running slot: a lead with many
    commands queued must not take every slot and send the other leads' one at a time.

    A job that raises stops every job not yet started (a lead's second message never
    overtakes a first that failed) and `on_failure` hears of it at once (the worker stops; the
    unfinished jobs' records are read again). From then on `submit` never returns: the caller
    (a Faust agent) must not go on and, restarted by its supervisor with new jobs, send what
    follows. Jobs already running are left to finish, not cancelled: a send cancelled after
    the channel took it would go out twice. Only a stopping worker whose drain ran out cancels
    them (`cancel_unfinished`).
    """

    PENDING_PER_SLOT = 8

    def __init__(self, limit: int, on_failure: Callable[[BaseException], Awaitable[None]]) -> None:
        self._running_slots = asyncio.Semaphore(limit)
        self._pending_slots = asyncio.Semaphore(limit * self.PENDING_PER_SLOT)
        self._on_failure = on_failure
        self._last_of_key: dict[Hashable, asyncio.Task[None]] = {}
        self._unfinished: set[asyncio.Task[None]] = set()
        # Jobs whose call has started: cancelled, the outside service may have taken it.
        self._in_progress: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None

    async def submit(self, key: Hashable, job: Job) -> None:
        """Starts `job` after `key`'s previous job; waits while too many are unfinished."""
        await self._pending_slots.acquire()
        if self.failure is not None:
            self._pending_slots.release()
            await asyncio.get_running_loop().create_future()  # until the stopping worker cancels
        previous = self._last_of_key.get(key)
        task = asyncio.create_task(self._run(key, previous, job))
        self._last_of_key[key] = task
        self._unfinished.add(task)
        task.add_done_callback(self._unfinished.discard)

    async def _run(self, key: Hashable, previous: asyncio.Task[None] | None, job: Job) -> None:
        try:
            if previous is not None:
                await asyncio.wait({previous})
            async with self._running_slots:
                if self.failure is None:
                    task = asyncio.current_task()
                    assert task is not None
                    self._in_progress.add(task)
                    try:
                        await job()
                    finally:
                        self._in_progress.discard(task)
        except Exception as exc:
            if self.failure is None:
                self.failure = exc
                logger.exception("a keyed job failed")
                await self._on_failure(exc)
        finally:
            self._pending_slots.release()
            if self._last_of_key.get(key) is asyncio.current_task():
                del self._last_of_key[key]

    async def wait_all(self) -> None:
        """Waits until every submitted job is done (or skipped after a failure)."""
        while self._unfinished:
            await asyncio.wait(set(self._unfinished))

    def cancel_unfinished(self) -> tuple[int, int]:
        """Cancels every unfinished job; returns how many were unfinished and how many of
        those had started their call (`wait_all` then waits until they are done).

        For a stopping worker whose drain ran out: left running, a job would be dropped half
        way by the closing loop, its end unknown. Its record is not acknowledged, so a restart
        runs it again; a started call may have reached the outside service already.
        """
        # A task done but not yet discarded by its callback is not counted.
        unfinished = [task for task in self._unfinished if not task.done()]
        started = sum(1 for task in unfinished if task in self._in_progress)
        for task in unfinished:
            task.cancel()
        return len(unfinished), started
