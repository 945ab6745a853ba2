"""Poison records: a record whose handling fails for a reason of its own is dead-lettered.

An agent that raises stops the worker (`mode.CrashingSupervisor`), and the restarted worker reads
the same record from the committed offset: a record that fails for what it carries (an id that
is not a UUID where PostgreSQL wants one, a number past what a table can encode, a text the
extractor cannot parse) stopped its partition, and every lead and tenant on it, for good. Events
are validated when decoded, but a valid event can still fail a rule or a store (a review found
fifteen such paths). So a handler's exception is sorted (`is_poison`):

- the record's own: a value the code cannot work with (ValueError, TypeError, KeyError and
  their kin) or one PostgreSQL refuses as data (SQLSTATE classes 22, data exception, and 23,
  integrity constraint violation). The record goes to the dead-letter topic with the exception
  as the reason and its raw bytes, the error is logged with its traceback, and the agent goes
  on with the next record;
- anything else stops the worker as before, and the record is read again after the restart:
  Kafka, PostgreSQL unreachable, restarting, read-only after a failover, a deadlock, a missing
  table or a refused password (a deployment's or an outage's failure, not the record's: skipping
  would drop every record until it is mended).

The handler's effects before it failed stay: those sent carry ids derived from the record, so a
replay of the dead letter once the cause is mended repeats none of them, but a table it changed
may make such a replay do less than the first run would have. `WORKER_POISON_RECORDS=stop` keeps
the old behaviour, for a deployment that would rather halt than skip a record. A stopping worker
always stops: a failure while the app shuts down is the shutdown's, not the record's.

A breaker bounds the skipping: past `WORKER_POISON_BREAKER_RECORDS` records whose handling
failed within `WORKER_POISON_BREAKER_WINDOW_S`, a failure stops the worker instead (records
that are no event at all are dead-lettered when decoded and not counted). So many records failing
at once is a deployment's failure (a release that cannot read what it is given), not theirs,
and dead-lettering the whole traffic while it lasts would leave every lead's processing to a
replay. Stopped, the records wait in their topics for the fix (each restart sets aside at most
that many again).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal

import asyncpg
from faust.types import TopicT

from flexoraa.db import UNREACHABLE
from streams.batches import SourceRecord
from streams.dead_letters import dead_letter_record
from streams.metrics import DEAD_LETTERS, POISON_BREAKER_TRIPS

logger = logging.getLogger(__name__)

PoisonPolicy = Literal["dead_letter", "stop"]
# What a value the code cannot work with raises: pydantic's ValidationError and orjson's and
# json's errors are ValueErrors or TypeErrors, an overflow an ArithmeticError.
_RECORDS_OWN = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError)
# SQLSTATE classes of data PostgreSQL refuses: 22 (data exception: an id that is no UUID, a NUL
# in a text, a number out of range; asyncpg's own encoding errors are 22000) and 23 (integrity
# constraint violation: a row of a tenant that does not exist).
_REFUSED_DATA_CLASSES = ("22", "23")
# A dead letter's reason is read in a log line or a dashboard, not a report.
REASON_MAX_CHARS = 500
# Zero from the start: the first skipped record is an increase the PoisonRecords alert sees.
DEAD_LETTERS.labels("processing_failed")


def is_poison(exc: BaseException) -> bool:
    """Whether `exc` is the record's own: handling the record again fails again, whatever the
    platform does meanwhile."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate[:2] in _REFUSED_DATA_CLASSES
    return isinstance(exc, _RECORDS_OWN) and not isinstance(exc, UNREACHABLE)


def failure_reason(exc: BaseException) -> str:
    reason = f"processing failed: {type(exc).__name__}: {exc}"
    return reason if len(reason) <= REASON_MAX_CHARS else reason[: REASON_MAX_CHARS - 1] + "…"


class PoisonRecords:
    """Runs a record's handler; a poison record is dead-lettered instead of stopping the worker."""

    def __init__(
        self,
        dead_letters: TopicT,
        *,
        policy: PoisonPolicy,
        is_stopping: Callable[[], bool],
        breaker_records: int = 0,
        breaker_window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dead_letters = dead_letters
        self._policy = policy
        self._is_stopping = is_stopping
        # 0: no breaker. The times of the letters within the window, oldest first.
        self._breaker_records = breaker_records
        self._breaker_window_s = breaker_window_s
        self._clock = clock
        self._lettered_at: deque[float] = deque()
        self._last_lettered: tuple[str, int, int] | None = None

    def should_dead_letter(self, exc: BaseException, *, breaker: bool = True) -> bool:
        """Whether the failure is the record's own and it is set aside; `breaker=False` for
        the parts of a batch whose whole the breaker let through (stopping halfway would
        leave the parts handled before it half done)."""
        return (
            self._policy == "dead_letter"
            and is_poison(exc)
            and not self._is_stopping()
            and not (breaker and self._tripped(exc))
        )

    def _tripped(self, exc: BaseException) -> bool:
        if self._breaker_records <= 0:
            return False
        now = self._clock()
        while self._lettered_at and now - self._lettered_at[0] > self._breaker_window_s:
            self._lettered_at.popleft()
        if len(self._lettered_at) < self._breaker_records:
            return False
        logger.critical(
            "poison breaker: %d records dead-lettered within %.0f s; stopping on %r instead."
            " So many failing records are a deployment's failure: fix it and restart, then"
            " `flexoraa dead-letters replay --reason \"processing failed\"` the letters",
            len(self._lettered_at), self._breaker_window_s, exc,
        )  # fmt: skip
        POISON_BREAKER_TRIPS.inc()
        return True

    async def handle(
        self, handler: Callable[[SourceRecord], Awaitable[None]], record: SourceRecord
    ) -> None:
        """`handler(record)`; a poison record dead-lettered, anything else raised."""
        try:
            await handler(record)
        except Exception as exc:
            if not self.should_dead_letter(exc):
                raise
            await self.dead_letter(record, exc)

    async def dead_letter(
        self,
        record: SourceRecord,
        exc: BaseException,
        *,
        raw: bytes | None = None,
        key: bytes | None = None,
        source_topic: str | None = None,
    ) -> None:
        """Dead-letters `record`, or only `raw`, the part of it that failed (one deadline of a
        record carrying a partition's due deadlines), under that part's own `key` and from its
        own `source_topic` if given."""
        position = (record.topic, record.partition, record.offset)
        if self._breaker_records > 0 and position != self._last_lettered:
            # Per record: the deadlines of one record are letters of their own.
            self._lettered_at.append(self._clock())
            self._last_lettered = position
        logger.error(
            "record %s[%s]@%s failed and is dead-lettered",
            record.topic, record.partition, record.offset, exc_info=exc,
        )  # fmt: skip
        await dead_letter_record(
            self._dead_letters, record, failure_reason(exc), "processing_failed",
            raw=raw, key=key, source_topic=source_topic,
        )  # fmt: skip
