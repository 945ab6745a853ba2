import pytest

from streams.rules.leakage import ACTIONS, leak_due_ms, temperature


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
