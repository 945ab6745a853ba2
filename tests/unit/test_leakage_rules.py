import pytest

from streams.rules.leakage import ACTIONS, after_reply, leak_due_ms, temperature, with_message


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
    wait = {"waiting_since_ms": 5_000, "due_ms": 65_000, "fired": False}
    assert with_message(wait, 5_000) is None  # the same message read again
    later = with_message(wait, 9_000)
    assert later == {**wait, "latest_ms": 9_000}
    earlier = with_message(later, 2_000)
    assert earlier == {"waiting_since_ms": 2_000, "due_ms": 62_000, "fired": False,
                       "latest_ms": 9_000}  # fmt: skip
    # A fired leak stays as it was reported; a message a known reply answered moves nothing.
    assert with_message({**wait, "fired": True}, 2_000) is None
    assert with_message({**wait, "replied_ms": 3_000}, 2_000) is None
    # A reply after the latest message answers it all; one before it leaves that one waited on.
    assert after_reply(earlier, 9_000) is None
    assert after_reply(earlier, 4_000) == {"waiting_since_ms": 9_000, "due_ms": 69_000,
                                           "fired": False, "replied_ms": 4_000}  # fmt: skip
    assert after_reply(wait, 6_000) is None  # no later message known
