"""Fetch pacing: how many bytes a worker's next fetch asks the broker to wait for.

A worker fetch returns as soon as any requested partition has a record. Under a steady load
some of the worker's 80 input partitions always have one, so it fetched as fast as it could
handle what came back: 350 fetches a second at 300 messages/s, each a full cycle of decoding,
dispatching to every agent, sending and committing, and 0.88 of a core against 0.47 with
fuller fetches (bench.freshness). Asking the broker for a minimum of bytes (Kafka's
`fetch.min.bytes`) makes each fetch carry more, but a fixed minimum holds every fetch of a
quiet worker for the whole `fetch.max.wait.ms`, on each hop of the pipeline.

So the minimum follows what the worker has been reading: about `interval_s` of it. A fetch
then waits at most about that long for records that arrive at the recent rate (and never past
the consumer's max wait), a busy worker makes about 1/`interval_s` fetches a second, and a
quiet one, reading little, asks for a byte and gets its records at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class _SizedRecord(Protocol):
    # aiokafka's ConsumerRecord: -1 for a missing key or value.
    serialized_key_size: int
    serialized_value_size: int


def record_bytes(records: Mapping[Any, Sequence[_SizedRecord]]) -> int:
    """The key and value bytes of a fetch's records (the broker also counts batch headers,
    so a minimum computed from these returns a little early, never late)."""
    return sum(
        max(record.serialized_key_size, 0) + max(record.serialized_value_size, 0)
        for batch in records.values()
        for record in batch
    )


class FetchPacer:
    """The fetch minimum, recomputed once per `window_s` from the bytes read in the last
    window. No I/O: the caller reports what it read and when, and applies the minimum."""

    def __init__(self, interval_s: float, max_bytes: int, window_s: float = 1.0) -> None:
        if interval_s < 0 or max_bytes < 1 or window_s <= 0:
            raise ValueError("interval_s >= 0, max_bytes >= 1 and window_s > 0 are required")
        self.interval_s = interval_s
        self.max_bytes = max_bytes
        self.window_s = window_s
        self.min_bytes = 1
        self._window_start: float | None = None
        self._window_bytes = 0

    def read(self, nbytes: int, now: float) -> int | None:
        """Counts `nbytes` read at `now` (a monotonic clock); returns the new minimum when a
        window ended and it changed, else None."""
        if self._window_start is None:
            self._window_start = now
        self._window_bytes += nbytes
        elapsed = now - self._window_start
        if elapsed < self.window_s:
            return None
        rate = self._window_bytes / elapsed
        self._window_start, self._window_bytes = now, 0
        paced = max(1, min(self.max_bytes, int(rate * self.interval_s)))
        if paced == self.min_bytes:
            return None
        self.min_bytes = paced
        return paced
