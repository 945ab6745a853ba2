"""Per-key mutual exclusion between agents of one worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyLocks:
    """An asyncio lock per key, kept only while someone holds or waits for it.

    Faust runs each agent's events one at a time, but two agents may work on the same lead at
    once (the interview agent on a new message, the deadlines agent resuming that lead's
    deferred messages); each read the lead's state before awaiting the model and the producer,
    so the later write dropped the other's step.
    """

    def __init__(self) -> None:
        self._locks: dict[bytes, asyncio.Lock] = {}
        self._users: dict[bytes, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
