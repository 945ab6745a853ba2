"""aiokafka's repeated error lines are let through once per interval, with a count."""

from __future__ import annotations

import logging

from flexoraa.logs import RepeatedLinesFilter, hold_back_repeated_lines


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_a_line_repeated_within_the_interval_is_held_back_and_counted_with_the_next() -> None:
    clock = Clock()
    lines = RepeatedLinesFilter(interval_s=5.0, clock=clock)
    shown = []
    for i in range(3000):
        clock.now = 100.0 + i * 0.001
        line = record("aiokafka", "Unable connect to node with id %s: %s", 1, "refused")
        if lines.filter(line):
            shown.append(line.getMessage())
    clock.now = 106.0
    last = record("aiokafka", "Unable connect to node with id %s: %s", 1, "refused")
    assert lines.filter(last)
    assert shown == ["Unable connect to node with id 1: refused"]
    assert last.getMessage() == (
        "Unable connect to node with id 1: refused [2999 more like this in the last 6 s]"
    )


def test_other_templates_and_other_loggers_are_not_held_back() -> None:
    clock = Clock()
    lines = RepeatedLinesFilter(interval_s=5.0, clock=clock)
    assert lines.filter(record("aiokafka.consumer.fetcher", "Failed fetch messages from %s", 1))
    assert lines.filter(record("aiokafka", "Unable to update metadata from %s", [1]))
    assert (
        lines.filter(record("aiokafka.consumer.fetcher", "Failed fetch messages from %s", 1))
        is False
    )
    for _ in range(3):
        assert lines.filter(record("flexoraa.db", "database unreachable (%r); retrying", "x"))
    assert lines.filter(record("aiokafkaesque", "Unable to update metadata", None))


def test_each_handler_has_its_own_filter() -> None:
    first, second = logging.StreamHandler(), logging.StreamHandler()
    hold_back_repeated_lines([first, second])
    line = record("aiokafka", "Unable to update metadata from %s", [1])
    assert first.filter(line)
    assert second.filter(line)
    assert not first.filter(record("aiokafka", "Unable to update metadata from %s", [1]))
