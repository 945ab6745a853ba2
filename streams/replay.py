"""Table recovery that applies a fetch's changelog records as one batch.

Faust replays a changelog one record at a time: its fetch loop delivers each record in two
tasks (the callback raced against the flow's suspension), the record goes through a queue, and
the recovery loop takes it with `wait_for` (a task and a timer more) and then scans every
changelog partition to see whether recovery is over. A worker restarted with 100,000 leads
(336,000 changelog records) was CPU-bound on that for 45 s at 7,500 records/s, its partitions
unserved the whole time (bench.reads, (h)).

Here the consumer hands the records of active changelog partitions under recovery straight to
`ReplayingRecovery.replay`, which decodes them with the changelog topic's own schema, applies
each partition's records to its table in one batch, advances the offsets Faust's recovery
tracks, and ends recovery the way Faust's loop does once every partition reached its
highwater. Standby partitions, and anything fetched in another consumer generation, still go
through Faust's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Any

from faust.exceptions import KeyDecodeError, ValueDecodeError
from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP, EventT, Message

from streams.metrics import CHANGELOG_RECORDS_REPLAYED

logger = logging.getLogger(__name__)

ToMessage = Callable[[TP, Any], Message]
# Records applied between two turns of the event loop (a fetch can hold tens of thousands).
REPLAY_SLICE = 2000


class ReplayingRecovery(Recovery):
    def split(
        self, records: Mapping[TP, list[Any]]
    ) -> tuple[dict[TP, list[Any]], dict[TP, list[Any]]]:
        """A fetch's records of active changelog partitions under recovery, and the rest."""
        if not self.in_recovery:
            return {}, dict(records)
        active_tps = self.active_tps
        replay: dict[TP, list[Any]] = {}
        rest: dict[TP, list[Any]] = {}
        for tp, batch in records.items():
            (replay if tp in active_tps else rest)[tp] = batch
        return replay, rest

    async def replay(
        self, records: Mapping[TP, Sequence[Any]], to_message: ToMessage,
        still_current: Callable[[], bool],
    ) -> None:  # fmt: skip
        """Applies the records of active changelog partitions, in batches of a partition's
        records; `still_current` says whether the fetch's consumer generation still is."""
        started = time.monotonic()
        applied = since_yield = 0
        for tp, batch in records.items():
            for first in range(0, len(batch), REPLAY_SLICE):
                if since_yield >= REPLAY_SLICE:
                    # The loop (requests, the stop signal) gets a turn between slices, across
                    # partitions too: a fetch holds up to 1 MiB of each.
                    await asyncio.sleep(0)
                    since_yield = 0
                # A rebalance meanwhile: its recovery seeks and reads the rest again.
                if not (still_current() and tp in self.active_tps):
                    break
                records_slice = batch[first : first + REPLAY_SLICE]
                applied += await self._apply(tp, records_slice, to_message)
                since_yield += len(records_slice)
                self._active_events_received_at[tp] = started
        if not applied:
            return
        now = time.monotonic()
        self._last_flush_at = now
        CHANGELOG_RECORDS_REPLAYED.inc(applied)
        # Wall time per record since the previous batch, fetches included, as Faust measures.
        previous = self._last_active_event_processed_at
        self._last_active_event_processed_at = now
        if previous is not None:
            self._record_processing_time((now - previous) / applied, applied)
        if self.in_recovery and not self.need_recovery():
            # As Faust's loop ends it: what its path buffered, then the signal recovery waits on.
            self.flush_buffers()
            self._set_recovery_ended()
            self.signal_recovery_end.set()

    async def _apply(self, tp: TP, records: Sequence[Any], to_message: ToMessage) -> int:
        """Applies one slice of a partition's records to its table; how many were new."""
        table = self.tp_to_table[tp]
        seen = self.active_offsets.get(tp)
        decode = table.changelog_topic.decode
        events: list[EventT[Any]] = []
        for record in records:
            # Read again after a seek: applied already (Faust's loop skips them too).
            if seen is not None and record.offset <= seen:
                continue
            try:
                event = await decode(to_message(tp, record), propagate=True)
            except (KeyDecodeError, ValueDecodeError) as exc:
                # Skipped as Faust's recovery skips it: a worker that stopped on it would stop
                # on it again at every restart.
                logger.error("undecodable changelog record %s@%d skipped: %r", tp, record.offset,
                             exc)  # fmt: skip
                continue
            await table.on_changelog_event(event)
            events.append(event)
        if not events:
            return 0
        # Records Faust's own path buffered for this table came first: applied first.
        buffered = self.buffers[table]
        if buffered:
            table.apply_changelog_batch(buffered)
            buffered.clear()
        table.apply_changelog_batch(events)
        self.active_offsets[tp] = events[-1].message.offset
        return len(events)

    def _set_recovery_started(self) -> None:
        super()._set_recovery_started()
        # Faust's loop clears the end signal right after setting it, before anything else
        # runs; `replay` leaves it set, so a recovery starting next must not find it set and
        # end at once with its tables unread.
        self.signal_recovery_end.clear()

    def _record_processing_time(self, per_record_s: float, records: int) -> None:
        """Feeds the estimate of the remaining time Faust logs during recovery."""
        times = self._processing_times
        times.extend(repeat(per_record_s, min(records, self.num_samples_required_for_estimate)))
        while len(times) > self.num_samples_required_for_estimate:
            times.popleft()


class ReplayingTableManager(TableManager):
    async def on_start(self) -> None:
        # Faust sleeps 1 s first, for tables created after the app started; the worker creates
        # every table in its composition root (streams.app) before it starts, and every start
        # and restart waited that second for nothing. A table created later fails loudly
        # (Faust's "Too late to add tables"); a topic an agent would create while running (a
        # group_by) would miss the first subscription: the worker has none.
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()

    @property
    def recovery(self) -> ReplayingRecovery:
        if self._recovery is None:
            self._recovery = ReplayingRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        if not isinstance(self._recovery, ReplayingRecovery):
            raise TypeError("the table manager's recovery is not a ReplayingRecovery")
        return self._recovery
