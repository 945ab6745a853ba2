"""Fetch pacing: how many bytes a worker's next fetch asks the broker to wait for.

A worker fetch returns as soon as any requested partition has a record. Under a steady load
some of the worker's 80 input partitions always have one, so it fetched as fast as it could
handle what came back: 350 fetches a second at 300 messages/s, each a full cycle of decoding,
dispatching to every agent, sending and committing: 0.89 of a core, against 0.47 with a fixed
minimum of 16 KiB a fetch (bench.freshness, one run each). Asking the broker for a minimum of
bytes (Kafka's `fetch.min.bytes`) makes each fetch carry more, but a fixed minimum holds every
fetch of a quiet worker for the whole `fetch.max.wait.ms`, on each hop of the pipeline.

So the minimum follows what the worker has been reading: about `interval_s` of it. A fetch
then waits about that long for records that arrive at the recent rate, and never past the
consumer's max wait: a busy worker makes about 1/`interval_s` fetches a second, and an idle
one (under 200 bytes a second at 10 ms) asks for a byte. The price is that wait on each hop:
measured at 100 messages/s, p50 freshness 8.9 ms against 7.5 and p99 28 ms against 11, for
0.38 of a core against 0.63 (bench.freshness, WORKER_FETCH_PACING_MS 10 against 0). After a
burst or a table's recovery the minimum stays high until a window without it ends (one to
two `window_s`), fetches then waiting out the max wait.

The bytes counted are keys and values as the consumer hands them over; the broker counts
batches as stored, with their headers and compressed: with a compressing producer the
minimum would be several intervals' worth and every fetch would wait out the max wait.
Nothing in this project compresses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class _SizedRecord(Protocol):
    # aiokafka's ConsumerRecord: -1 for a missing key or value.
    serialized_key_size: int
    serialized_value_size: int


def record_bytes(records: Mapping[Any, Sequence[_SizedRecord]]) -> int:
    """The key and value bytes of a fetch's records (uncompressed, without batch headers)."""
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
