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

# Stale entries tolerated beyond the live ones before the heap is rebuilt from those.
_COMPACT_SLACK = 1024


class DeadlineIndex:
    """Due times of this worker's pending deadlines.

    A heap cannot drop an entry, so a deadline that moves leaves its old one behind, skipped
    when it comes due. A lead's window and silence deadlines move with every message it sends
    and their old entries come due a day later: without a bound the heap held three entries per
    message of the last day (about 460 bytes each: 4 GB a day at 100 messages/s). So the live
    due time of every (lead, name) is kept beside the heap, and the heap is rebuilt from them
    once stale entries outnumber live ones (amortised, a constant cost per entry)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, bytes, str]] = []
        self._live: dict[tuple[bytes, str], int] = {}

    def schedule(self, key: bytes, name: str, due_ms: int) -> None:
        self._live[(key, name)] = due_ms
        heapq.heappush(self._heap, (due_ms, key, name))
        if len(self._heap) > 2 * len(self._live) + _COMPACT_SLACK:
            self._heap = [(due_ms, key, name) for (key, name), due_ms in self._live.items()]
            heapq.heapify(self._heap)

    def forget(self, key: bytes, name: str) -> None:
        """The deadline was cancelled: its entry is stale."""
        self._live.pop((key, name), None)

    def pop_due(self, now_ms: int) -> list[tuple[bytes, str, int]]:
        """The live deadlines due by `now_ms`, in due order; they leave the index."""
        due = []
        while self._heap and self._heap[0][0] <= now_ms:
            due_ms, key, name = heapq.heappop(self._heap)
            if self._live.get((key, name)) == due_ms:
                del self._live[(key, name)]
                due.append((key, name, due_ms))
        return due

    def reset(self, entries: Iterable[tuple[bytes, str, int]]) -> None:
        self._live = {(key, name): due_ms for key, name, due_ms in entries}
        self._heap = [(due_ms, key, name) for (key, name), due_ms in self._live.items()]
        heapq.heapify(self._heap)

    @property
    def heap_size(self) -> int:
        """Entries in the heap, stale ones included."""
        return len(self._heap)

    def __len__(self) -> int:
        return len(self._live)


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
            self.index.forget(key, name)
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
