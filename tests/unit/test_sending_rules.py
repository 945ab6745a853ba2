from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from pydantic import ValidationError

from flexoraa.settings import Settings
from streams.rules.delivery import supersedes
from streams.rules.sending import (
    failed_outside_window,
    freeform_window_open,
    plan_send,
    reachable,
    template_parameters,
)
from streams.rules.window import WINDOW_MS, window_deadlines
from streams.timers import DeadlineIndex, Scheduler

T = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
LATER = T + timedelta(seconds=5)


@pytest.mark.parametrize(
    ("channel", "window_open", "template", "kind"),
    [
        ("whatsapp", True, True, "freeform"),
        ("whatsapp", True, False, "freeform"),
        ("whatsapp", False, True, "template"),
        ("whatsapp", False, False, None),
        ("instagram", True, False, "freeform"),
        ("instagram", False, True, None),
        ("facebook", False, True, None),
        ("email", True, True, None),
    ],
)
def test_plan_send(channel: str, window_open: bool, template: bool, kind: str | None) -> None:
    plan = plan_send(channel, window_open, template)
    assert plan.kind == kind
    assert (plan.failure is None) == (kind is not None)


def test_a_resend_meta_failed_for_the_window_goes_only_as_a_template() -> None:
    assert plan_send("whatsapp", True, True, template_only=True).kind == "template"
    assert plan_send("whatsapp", True, False, template_only=True).kind is None
    assert plan_send("instagram", True, True, template_only=True).kind is None
    assert failed_outside_window("whatsapp", "failed", "131047")
    assert not failed_outside_window("whatsapp", "failed", "131026")
    assert not failed_outside_window("whatsapp", "delivered", None)
    assert not failed_outside_window("instagram", "failed", "131047")


@pytest.mark.parametrize(
    ("channel", "template", "minutes_left", "freeform"),
    [
        ("whatsapp", True, 3, True),
        # Meta answers 200 and fails it later: the template goes instead.
        ("whatsapp", True, 1, False),
        ("whatsapp", False, 1, True),  # nothing else could go
        ("instagram", True, 1, True),
        ("whatsapp", True, 0, False),
    ],
)
def test_the_last_minutes_of_a_whatsapp_window_go_by_template(
    channel: str, template: bool, minutes_left: int, freeform: bool
) -> None:
    now_ms = 1_764_000_000_000
    closes_at_ms = now_ms + minutes_left * 60_000
    assert freeform_window_open(channel, closes_at_ms, now_ms, template) is freeform
    assert not freeform_window_open(channel, None, now_ms, template)


def test_outside_the_window_never_freeform() -> None:
    for template in (True, False):
        assert plan_send("whatsapp", False, template).kind != "freeform"


def test_template_parameters_in_order() -> None:
    assert template_parameters(
        "contact_name, text", contact_name="Asha", text="See you", contact="9198"
    ) == ["Asha", "See you"]
    assert template_parameters("contact_name", contact_name=None, text="x", contact="9") == [
        "there"
    ]
    with pytest.raises(ValueError, match="favourite_colour"):
        template_parameters("favourite_colour", contact_name=None, text="x", contact="9")


def test_template_parameters_are_one_line_as_meta_requires() -> None:
    # Meta refuses a parameter with a newline, a tab or over four spaces in a row (132018):
    # a multi-line reply outside the window failed.
    assert template_parameters(
        "contact_name,text", contact_name="Asha\tK", text="Hi!\n\nOur call:     3pm", contact="9"
    ) == ["Asha K", "Hi! Our call: 3pm"]


def test_an_unknown_template_field_stops_the_process_at_start() -> None:
    with pytest.raises(ValidationError, match="txet"):
        Settings(whatsapp_template_parameters="contact_name,txet")


@pytest.mark.parametrize(
    ("current", "current_at", "new", "new_at", "applies"),
    [
        (None, None, "sent", T, True),
        ("sent", T, "delivered", LATER, True),
        ("delivered", T, "read", LATER, True),
        ("read", T, "delivered", LATER, False),  # read is never overwritten by delivered
        ("read", LATER, "delivered", T, False),
        ("delivered", LATER, "read", T, True),  # read may arrive stamped earlier
        ("delivered", LATER, "sent", T, False),  # older
        ("delivered", T, "sent", LATER, False),  # never back to sent
        ("sent", T, "delivered", T, True),  # same second: the further state
        ("delivered", T, "sent", T, False),
        ("sent", T, "failed", LATER, True),
        ("delivered", LATER, "failed", T, False),
    ],
)
def test_status_precedence(
    current: str | None, current_at: datetime | None, new: str, new_at: datetime, applies: bool
) -> None:
    assert supersedes(current, current_at, new, new_at) is applies


def test_window_deadlines() -> None:
    assert window_deadlines("whatsapp", 0, 3_600_000) == {
        "window_closing": WINDOW_MS - 3_600_000,
        "window_expired": WINDOW_MS,
    }
    assert window_deadlines("email", 0, 3_600_000) == {}


def test_deadline_index_pops_in_order() -> None:
    index = DeadlineIndex()
    index.schedule(b"b", "x", 20)
    index.schedule(b"a", "x", 10)
    index.schedule(b"c", "x", 30)
    assert index.pop_due(5) == []
    assert index.pop_due(20) == [(b"a", "x", 10), (b"b", "x", 20)]
    index.reset([(b"d", "y", 1), (b"e", "y", 40)])
    assert len(index) == 2
    assert index.pop_due(100) == [(b"d", "y", 1), (b"e", "y", 40)]


def test_moved_and_cancelled_deadlines_do_not_pile_up_in_the_index() -> None:
    # A lead's window and silence deadlines move with every message it sends: each move left
    # its old entry in the heap until it came due, a day later.
    index = DeadlineIndex()
    scheduler = Scheduler(cast(Any, {}), index)
    for message in range(20_000):
        scheduler.set(b"lead", {"window_expired": 86_400_000 + message, "silence": message})
    scheduler.set(b"other", {"silence": 5})
    scheduler.cancel(b"other", "silence")
    assert len(index) <= 2 * 2 + 1024 + 2  # the last rebuild's two, and what came after
    fired = [(key, name, due) for key, name, due in index.pop_due(10**12)
             if scheduler.pending(key).get(name) == due]  # as the timer re-checks  # fmt: skip
    assert fired == [(b"lead", "silence", 19_999), (b"lead", "window_expired", 86_419_999)]


@pytest.mark.parametrize(
    ("channel", "window_open", "template", "expected"),
    [
        ("email", False, False, True),
        ("whatsapp", False, True, True),
        ("whatsapp", False, False, False),
        ("instagram", False, True, False),
        ("facebook", True, False, True),
        ("sms", True, True, False),
    ],
)
def test_which_leads_a_message_can_reach(
    channel: str, window_open: bool, template: bool, expected: bool
) -> None:
    assert reachable(channel, window_open, template) is expected
