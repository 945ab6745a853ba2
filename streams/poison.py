"""Poison records: a record whose handling fails for a reason of its own is dead-lettered.

An agent that raises stops the worker (`mode.CrashingSupervisor`), and the restarted worker reads
the same record from the committed offset: a record that fails for what it carries (an id that
is not a UUID where PostgreSQL wants one, a number past what a table can encode, a text the
extractor cannot parse) stopped its partition, and every lead and tenant on it, for good. Events
are validated when decoded, but a valid event can still fail a rule or a store (a review found
fifteen such paths). So a handler's exception is sorted:

- transient (Kafka, PostgreSQL unreachable, the network): the worker stops as before, and the
  record is read again once the outage is over, so nothing is lost;
- anything else: the record goes to the dead-letter topic with the exception as the reason
  (its raw bytes kept, to replay once the cause is mended), the error is logged with its
  traceback, and the agent goes on with the next record.

Effects the handler produced before it failed stay (each is idempotent by event id, as on any
replay). `WORKER_POISON_RECORDS=stop` keeps the old behaviour, for a deployment that would rather
halt than skip a record. A stopping worker always stops: a failure while the app shuts down is
the shutdown's, not the record's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.types import TopicT

from flexoraa.db import UNREACHABLE
from streams.batches import SourceRecord
from streams.dead_letters import send_dead_letter
from streams.metrics import DEAD_LETTERS

logger = logging.getLogger(__name__)

PoisonPolicy = Literal["dead_letter", "stop"]
# Failures of the platform, not of the record: read the record again after a restart.
TRANSIENT: tuple[type[BaseException], ...] = (
    *UNREACHABLE,
    KafkaError,
    ProducerSendError,
    asyncio.TimeoutError,
)
# A dead letter's reason is read in a log line or a dashboard, not a report.
REASON_MAX_CHARS = 500
# Zero from the start: the first skipped record is an increase the PoisonRecords alert sees.
DEAD_LETTERS.labels("processing_failed")


def is_poison(exc: BaseException) -> bool:
    """Whether `exc` is the record's own (handling it again fails again)."""
    return isinstance(exc, Exception) and not isinstance(exc, TRANSIENT)


def failure_reason(exc: BaseException) -> str:
    reason = f"processing failed: {type(exc).__name__}: {exc}"
    return reason if len(reason) <= REASON_MAX_CHARS else reason[: REASON_MAX_CHARS - 1] + "…"


def _key(record: SourceRecord) -> bytes | None:
    return record.key if isinstance(record.key, bytes) else None


def _raw(record: SourceRecord) -> bytes:
    return record.value if isinstance(record.value, bytes) else b""


class PoisonRecords:
    """Runs a record's handler; a poison record is dead-lettered instead of stopping the worker."""

    def __init__(
        self,
        dead_letters: TopicT,
        *,
        policy: PoisonPolicy,
        is_stopping: Callable[[], bool],
    ) -> None:
        self._dead_letters = dead_letters
        self._policy = policy
        self._is_stopping = is_stopping

    def should_dead_letter(self, exc: BaseException) -> bool:
        return self._policy == "dead_letter" and is_poison(exc) and not self._is_stopping()

    async def handle(
        self, handle: Callable[[SourceRecord], Awaitable[None]], record: SourceRecord
    ) -> None:
        try:
            await handle(record)
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
    ) -> None:
        """Dead-letters `record`, or only `raw`, the part of it that failed (one deadline of a
        record carrying a partition's due deadlines), under that part's own `key` if given."""
        logger.error(
            "record %s[%s]@%s failed and is dead-lettered",
            record.topic, record.partition, record.offset, exc_info=exc,
        )  # fmt: skip
        await send_dead_letter(
            self._dead_letters,
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=key if key is not None else _key(record),
            raw=raw if raw is not None else _raw(record),
            reason=failure_reason(exc),
            kind="processing_failed",
        )
