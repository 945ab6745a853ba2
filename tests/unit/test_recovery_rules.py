from datetime import UTC, datetime

import pytest

from streams.rules.recovery import (
    STRATEGIES,
    local_hour_window_start,
    next_local_hour,
    next_step_due_ms,
    recovery_text,
    step_due_ms,
)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.mark.parametrize(
    ("after", "zone", "expected"),
    [
        ("2026-11-24T03:00:00+00:00", "UTC", "2026-11-24T10:00:00+00:00"),
        ("2026-11-24T10:00:00+00:00", "UTC", "2026-11-24T10:00:00+00:00"),
        ("2026-11-24T10:00:01+00:00", "UTC", "2026-11-25T10:00:00+00:00"),
        # 10:00 in Kolkata is 04:30 UTC.
        ("2026-11-24T03:00:00+00:00", "Asia/Kolkata", "2026-11-24T04:30:00+00:00"),
        ("2026-11-24T05:00:00+00:00", "Asia/Kolkata", "2026-11-25T04:30:00+00:00"),
        # Across the US spring-forward: still 10:00 local (14:00 UTC after, 15:00 before).
        ("2026-03-07T16:00:00+00:00", "America/New_York", "2026-03-08T14:00:00+00:00"),
        # A zone this machine's tz database lacks (a row written past the API's check, or a
        # zone a tzdata update dropped) is UTC, not a failure at every step.
        ("2026-11-24T03:00:00+00:00", "Mars/Olympus", "2026-11-24T10:00:00+00:00"),
        ("2026-11-24T03:00:00+00:00", "../etc/passwd", "2026-11-24T10:00:00+00:00"),
        # A directory of the database, and a name too long for a path: OSErrors, which the
        # agents' retry loop took for an unreachable database.
        ("2026-11-24T03:00:00+00:00", "America", "2026-11-24T10:00:00+00:00"),
        ("2026-11-24T03:00:00+00:00", "Europe/" + "x" * 300, "2026-11-24T10:00:00+00:00"),
    ],
)
def test_next_local_hour(after: str, zone: str, expected: str) -> None:
    assert next_local_hour(ms(after), zone, 10) == ms(expected)


def test_steps_follow_the_delays_at_the_local_hour() -> None:
    start = ms("2026-11-24T12:00:00+00:00")
    delays = (0, 48 * 3600, 96 * 3600, 168 * 3600)
    dues = [step_due_ms(start, k, delays, "UTC", 10) for k in range(4)]
    assert [datetime.fromtimestamp(d / 1000, tz=UTC).isoformat() for d in dues] == [
        "2026-11-25T10:00:00+00:00",
        "2026-11-27T10:00:00+00:00",
        "2026-11-29T10:00:00+00:00",
        "2026-12-02T10:00:00+00:00",
    ]
    assert step_due_ms(start, 1, (0, 5, 9, 12), "UTC", None) == start + 5000


def test_the_seed_order_and_texts() -> None:
    assert STRATEGIES == ("re_engagement", "curiosity", "educational", "soft_cta")
    assert recovery_text(0, "Asha").startswith("Hi Asha,")
    assert recovery_text(3, None).startswith("Hi there,")


HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def test_a_sequence_held_up_goes_on_at_its_own_pace() -> None:
    # Step 0 was due at once but a tenant without tokens sent it five days late: steps 1 and 2,
    # long overdue, went out right after it, three messages in a minute.
    delays = (0, 3_600, 7_200)
    sent = 5 * DAY_MS
    assert next_step_due_ms(0, 1, sent, delays, "UTC", None) == sent + HOUR_MS
    assert next_step_due_ms(0, 2, sent + HOUR_MS, delays, "UTC", None) == sent + 2 * HOUR_MS
    # On time, the sequence's own times.
    assert next_step_due_ms(0, 1, 0, delays, "UTC", None) == HOUR_MS


def test_a_step_resumed_outside_its_local_hour_waits_for_it() -> None:
    ten = int(datetime(2026, 12, 4, 10, 0, tzinfo=UTC).timestamp() * 1000)
    assert local_hour_window_start(ten, "UTC", 10) == ten
    assert local_hour_window_start(ten + 59 * 60_000, "UTC", 10) == ten  # still its hour
    assert local_hour_window_start(ten + HOUR_MS, "UTC", 10) == ten + DAY_MS
    assert local_hour_window_start(ten - 1, "UTC", 10) == ten


def test_a_step_sent_just_after_its_hour_keeps_the_next_on_its_day() -> None:
    # Sent 0.3 s after 10:00 (a timer tick, the work), the spacing ended just past 10:00 two
    # days later and the next step went a day late, every step.
    zone = "Asia/Kolkata"
    started = int(datetime(2026, 3, 2, 15, 37, tzinfo=UTC).timestamp() * 1000)
    delays = (0, 2 * 86_400, 4 * 86_400, 7 * 86_400)
    sent = step_due_ms(started, 0, delays, zone, 10) + 300
    for step in (1, 2, 3):
        due = next_step_due_ms(started, step, sent, delays, zone, 10)
        assert due == step_due_ms(started, step, delays, zone, 10)
        sent = due + 300
