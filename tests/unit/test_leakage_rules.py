import pytest

from streams.rules.leakage import (
    ACTIONS,
    UNANSWERED_KEPT,
    after_reply,
    leak_due_ms,
    new_wait,
    temperature,
    with_earlier_reply,
    with_message,
    with_threshold,
)


@pytest.mark.parametrize(
    ("score", "followed_up", "expected"),
    [
        (None, False, "COLD"),
        (0, False, "COLD"),
        (29.9, False, "COLD"),
        (0, True, "WARM"),
        (30, False, "WARM"),
        (39.9, True, "WARM"),
        (40, True, "HOT"),
        (69.9, False, "WARM"),
        (70, False, "HOT"),
        (100, True, "HOT"),
    ],
)
def test_temperature(score: float | None, followed_up: bool, expected: str) -> None:
    assert temperature(score, followed_up) == expected


def test_actions_and_deadline() -> None:
    assert ACTIONS == {"HOT": "ai_reengagement", "WARM": "reassign", "COLD": "escalate_admins"}
    assert leak_due_ms(1_000, 1800) == 1_801_000


def test_a_wait_takes_messages_and_replies_in_any_order() -> None:
    now = 10_000
    wait = new_wait(5_000, 60, None)
    assert wait == {"waiting_since_ms": 5_000, "due_ms": 65_000, "fired": False,
                    "replied_ms": -1, "unanswered_ms": [5_000]}  # fmt: skip
    assert with_message(wait, 5_000, now) is None  # the same message read again
    later = with_message(wait, 9_000, now)
    assert later == {**wait, "unanswered_ms": [5_000, 9_000]}
    earlier = with_message(later, 2_000, now)
    assert earlier == {**wait, "waiting_since_ms": 2_000, "due_ms": 62_000,
                       "unanswered_ms": [2_000, 5_000, 9_000]}  # fmt: skip
    # A reply after the latest message answers them all; one between leaves the rest waited
    # on, from the earliest.
    assert after_reply(earlier, 9_000) is None
    assert after_reply(earlier, 4_000) == {"waiting_since_ms": 5_000, "due_ms": 65_000,
                                           "fired": False, "replied_ms": 4_000,
                                           "unanswered_ms": [5_000, 9_000]}  # fmt: skip


def test_a_wait_does_not_move_once_due_fired_answered_or_older_than_the_rules() -> None:
    wait = new_wait(5_000, 60, 3_000)
    assert with_message(wait, 2_000, 10_000) is None  # the reply at 3_000 answered it
    # Due (its leak being reported under its due time's ids), fired, or written before these
    # rules (which replies preceded it is unknown): recorded, not moved.
    for stays, now in [
        (wait, 65_000),
        ({**wait, "fired": True}, 10_000),
        ({"waiting_since_ms": 5_000, "due_ms": 65_000, "fired": False}, 10_000),
    ]:
        changed = with_message(stays, 4_000, now)
        assert changed is not None
        assert (changed["waiting_since_ms"], changed["due_ms"]) == (5_000, 65_000)
    # A reply before the wait: earlier messages are answered; an older wait learns nothing.
    assert with_earlier_reply(wait, 4_000) == {**wait, "replied_ms": 4_000}
    assert with_earlier_reply(wait, 2_000) is None
    assert with_earlier_reply({"waiting_since_ms": 5_000, "due_ms": 65_000, "fired": False},
                              4_000) is None  # fmt: skip


def test_a_wait_keeps_its_earliest_and_latest_unanswered_messages() -> None:
    wait = new_wait(0, 60, None)
    for at in range(1, 40):
        changed = with_message(wait, at * 10, 1)
        assert changed is not None
        wait = changed
    assert len(wait["unanswered_ms"]) == UNANSWERED_KEPT
    assert wait["unanswered_ms"][0] == 0
    assert wait["unanswered_ms"][-1] == 390


def test_past_the_cap_a_reply_read_late_still_leaves_the_next_message_waited_on() -> None:
    # A lead writing every 30 s for 8 minutes, answered at 7:15 (a Gmail poll read the reply
    # late): the wait is from 7:30, not from the latest message.
    wait = new_wait(0, 1800, None)
    for at in range(30_000, 480_001, 30_000):
        changed = with_message(wait, at, 1)
        assert changed is not None
        wait = changed
    assert len(wait["unanswered_ms"]) == UNANSWERED_KEPT
    follow_up = after_reply(wait, 435_000)
    assert follow_up is not None
    assert follow_up["waiting_since_ms"] == 450_000


def test_a_wait_takes_a_new_threshold_until_it_fired_or_is_due() -> None:
    # A reply left the lead's next message waited on with the answered wait's 60 s; the
    # tenant has 30 s by then: the follow-up is a new wait, due 30 s after its message.
    wait = with_message(new_wait(5_000, 60, None), 9_000, 10_000)
    assert wait is not None
    follow_up = after_reply(wait, 6_000)
    assert follow_up is not None
    assert follow_up["due_ms"] == 69_000
    assert with_threshold(follow_up, 30, 12_000) == {**follow_up, "due_ms": 39_000}
    assert with_threshold(follow_up, 60, 12_000) is None  # unchanged
    # Fired, or due already (its leak being reported under its due time's ids): left be.
    assert with_threshold({**follow_up, "fired": True}, 30, 12_000) is None
    assert with_threshold(follow_up, 30, 69_000) is None
