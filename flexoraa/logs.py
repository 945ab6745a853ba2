"""Log lines that repeat in a tight loop, let through once per interval with a count.

With the broker down, aiokafka's clients log every failed connection and metadata attempt. A
worker logged 3,000 to 7,000 error lines a second, 500,000 in a two-minute outage, before its
metadata retries were made to back off (flexoraa.kafka.back_off_failed_metadata_updates); they
still come at about 130 a second (measured). The first line of each kind still shows at once,
and the count of the ones held back follows with the next one let through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Kinds of line remembered before the quiet ones are forgotten.
MAX_KINDS = 1000


@dataclass
class _Seen:
    let_through_at: float
    held_back: int = 0


class RepeatedLinesFilter(logging.Filter):
    """Lets a record of `loggers` through at most once per `interval_s` for each logger and
    message template (its arguments, such as a node id or an error, may differ)."""

    def __init__(
        self,
        loggers: tuple[str, ...] = ("aiokafka",),
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._prefixes = loggers
        self._interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, str], _Seen] = {}
        # A handler calls its filters outside its lock, and aiokafka logs from Faust's consumer
        # thread as well as from the main one.
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not any(name == p or name.startswith(p + ".") for p in self._prefixes):
            return True
        key = (name, str(record.msg))
        with self._lock:
            now = self._clock()
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) >= MAX_KINDS:
                    # Lines already formatted differ every time: forget the quiet kinds.
                    self._seen = {
                        k: v
                        for k, v in self._seen.items()
                        if now - v.let_through_at < self._interval_s
                    }
                self._seen[key] = _Seen(now)
                return True
            if now - seen.let_through_at < self._interval_s:
                seen.held_back += 1
                return False
            held_back, since = seen.held_back, seen.let_through_at
            seen.let_through_at, seen.held_back = now, 0
        if held_back:
            # Escaped: the record's message is %-formatted with its arguments later.
            note = f" [{held_back} more like this in the last {now - since:.0f} s]"
            record.msg = str(record.msg) + note.replace("%", "%%")
        return True


def hold_back_repeated_lines(handlers: Iterable[logging.Handler]) -> None:
    """Puts a filter on each of `handlers` (a handler's filters see the records of every
    logger); one each, or the second would hold back what the first just let through."""
    for handler in handlers:
        handler.addFilter(RepeatedLinesFilter())
