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
    """At most `limit` jobs at once (running or waiting for their key's previous one); the jobs
    of one key one after another, in the order submitted.

    A job that raises stops every job not yet started (a lead's second message never
    overtakes a first that failed), `submit` raises the error from then on, and `on_failure`
    hears of it at once (the worker stops; the unfinished jobs' records
    are read again). Jobs already running are left to finish, not cancelled: a send cancelled
    after the channel took it would go out twice.
    """

    def __init__(self, limit: int, on_failure: Callable[[BaseException], Awaitable[None]]) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._on_failure = on_failure
        self._last_of_key: dict[Hashable, asyncio.Task[None]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None

    async def submit(self, key: Hashable, job: Job) -> None:
        """Starts `job` after `key`'s previous job; waits while `limit` jobs are unfinished."""
        if self.failure is not None:
            raise self.failure
        await self._slots.acquire()
        previous = self._last_of_key.get(key)
        task = asyncio.create_task(self._run(key, previous, job))
        self._last_of_key[key] = task
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, key: Hashable, previous: asyncio.Task[None] | None, job: Job) -> None:
        try:
            if previous is not None:
                await asyncio.wait({previous})
            if self.failure is None:
                await job()
        except Exception as exc:
            if self.failure is None:
                self.failure = exc
                logger.exception("a keyed job failed")
                await self._on_failure(exc)
        finally:
            self._slots.release()
            if self._last_of_key.get(key) is asyncio.current_task():
                del self._last_of_key[key]

    async def wait_all(self) -> None:
        """Waits until every submitted job is done (or skipped after a failure)."""
        while self._running:
            await asyncio.wait(set(self._running))
