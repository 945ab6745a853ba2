"""Log lines that repeat in a tight loop, let through once per interval with a count.

With the broker down, aiokafka's clients retry their metadata request without a backoff (the
sender and the fetcher ask again as soon as the last attempt failed): a worker logged about
3,000 error lines a second, 500,000 in a two-minute outage, while it used 0.2-0.3 of a core.
The first line of each kind still shows at once, and the count of the ones held back follows
with the next one let through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


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

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not any(name == p or name.startswith(p + ".") for p in self._prefixes):
            return True
        now = self._clock()
        key = (name, str(record.msg))
        seen = self._seen.get(key)
        if seen is None:
            self._seen[key] = _Seen(now)
            return True
        if now - seen.let_through_at < self._interval_s:
            seen.held_back += 1
            return False
        if seen.held_back:
            # Escaped: the record's message is %-formatted with its arguments later.
            note = (
                f" [{seen.held_back} more like this in the last {now - seen.let_through_at:.0f} s]"
            )
            record.msg = str(record.msg) + note.replace("%", "%%")
        seen.let_through_at, seen.held_back = now, 0
        return True


def hold_back_repeated_lines(handlers: Iterable[logging.Handler]) -> None:
    """Puts the filter on `handlers`: a handler's filters see the records of every logger."""
    line_filter = RepeatedLinesFilter()
    for handler in handlers:
        handler.addFilter(line_filter)
