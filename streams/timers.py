"""Per-lead deadlines that fire within a tick (DESIGN.md, "Timers").

Faust has no per-key timers, so:
* an agent that sets a deadline stores it in the `deadlines` table (lead → {name: due_ms}) and
  in this worker's in-memory index;
* a timer ticking every `timer_tick_ms` on every worker pops the due entries of the partitions
  it actively owns and sends them, one "deadlines reached" record per partition, to that
  partition of a co-partitioned topic;
* the agent of that topic re-checks the table (the deadline may have moved or been answered),
  removes it and calls the deadline's handler.

Firing is therefore idempotent, survives restarts (the index is rebuilt from the table after
every recovery, so overdue deadlines fire on the first tick) and is at most a tick late.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from faust.types import TableT

# Entries beyond twice those of the last rebuild that start a new one (a small index is not
# rebuilt for every few moves).
_REBUILD_SLACK = 1024


class DeadlineIndex:
    """Due times of this worker's pending deadlines; an entry's deadline may have moved or been
    cancelled since (its firing re-checks the table).

    A heap cannot drop an entry, so a deadline that moves leaves its old one behind. A lead's
    window and silence deadlines move with every message it sends and their old entries come
    due a day later: without a bound the heap held three entries per message of the last day
    (about 460 bytes each: 4 GB a day at 100 messages/s). So the heap is rebuilt from the
    deadlines table, the truth, once it holds twice the entries of its last rebuild: a constant
    cost per entry, and no copy of the live due times beside the heap (130 bytes a deadline)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, bytes, str]] = []
        self._rebuilt_size = 0

    def schedule(self, key: bytes, name: str, due_ms: int) -> None:
        heapq.heappush(self._heap, (due_ms, key, name))

    @property
    def needs_rebuild(self) -> bool:
        return len(self._heap) > 2 * self._rebuilt_size + _REBUILD_SLACK

    def pop_due(self, now_ms: int) -> list[tuple[bytes, str, int]]:
        due = []
        while self._heap and self._heap[0][0] <= now_ms:
            due_ms, key, name = heapq.heappop(self._heap)
            due.append((key, name, due_ms))
        return due

    def reset(self, entries: Iterable[tuple[bytes, str, int]]) -> None:
        self._heap = [(due_ms, key, name) for key, name, due_ms in entries]
        heapq.heapify(self._heap)
        self._rebuilt_size = len(self._heap)

    def __len__(self) -> int:
        return len(self._heap)


class Scheduler:
    """Sets and cancels a lead's deadlines; call only from an agent processing that lead."""

    def __init__(self, table: TableT[bytes, Any], index: DeadlineIndex) -> None:
        self.table = table
        self.index = index

    def pending(self, key: bytes) -> dict[str, int]:
        return dict(self.table.get(key) or {})

    def set(self, key: bytes, deadlines: dict[str, int]) -> None:
        """Set (or move) several deadlines of one lead at once."""
        pending = self.pending(key)
        changed = {name: due for name, due in deadlines.items() if pending.get(name) != due}
        if not changed:
            return
        pending.update(changed)
        self.table[key] = pending
        for name, due_ms in changed.items():
            self.index.schedule(key, name, due_ms)
        if self.index.needs_rebuild:
            self.rebuild_index()

    def set_if_absent(self, key: bytes, name: str, due_ms: int) -> bool:
        """Set a deadline unless one of that name is pending; whether it was set."""
        if name in self.pending(key):
            return False
        self.set(key, {name: due_ms})
        return True

    def cancel(self, key: bytes, *names: str) -> None:
        pending = self.pending(key)
        if not any(name in pending for name in names):
            return
        for name in names:
            pending.pop(name, None)
        if pending:
            self.table[key] = pending
        else:
            del self.table[key]

    def rebuild_index(self) -> None:
        self.index.reset(
            (key, name, due_ms)
            for key, pending in self.table.items()
            for name, due_ms in (pending or {}).items()
        )
