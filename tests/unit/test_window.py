import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.messaging import DeadlineReached
from streams.agents import window as window_agent
from streams.rules.window import WINDOW_MS, is_window_open, window_state
from tests.fakes.topics import RecordingTopic

T0 = int(datetime(2026, 11, 24, 10, 0, tzinfo=UTC).timestamp() * 1000)
SECOND = 1000


@pytest.mark.parametrize(
    ("now_ms", "expected_open"),
    [
        (T0, True),
        (T0 + 1, True),
        (T0 + WINDOW_MS - SECOND, True),  # one second before 24 h
        (T0 + WINDOW_MS - 1, True),
        (T0 + WINDOW_MS, False),  # at 24 h exactly: closed
        (T0 + WINDOW_MS + SECOND, False),
        (T0 + 7 * WINDOW_MS, False),
    ],
)
def test_window_boundary(now_ms: int, expected_open: bool) -> None:
    assert is_window_open(T0, now_ms) is expected_open


def test_no_customer_message_means_closed() -> None:
    assert is_window_open(None, T0) is False


def test_window_is_measured_from_the_customer_message() -> None:
    state = window_state("whatsapp", T0, T0 + SECOND)
    assert state.applies
    assert state.open
    assert state.closes_at_ms == T0 + int(timedelta(hours=24).total_seconds() * 1000)


@pytest.mark.parametrize("channel", ["whatsapp", "instagram", "facebook"])
def test_meta_channels_have_a_window(channel: str) -> None:
    assert window_state(channel, T0, T0 + WINDOW_MS).applies
    assert not window_state(channel, T0, T0 + WINDOW_MS).open


@pytest.mark.parametrize("channel", ["email", "sms", "webchat"])
def test_other_channels_have_no_window(channel: str) -> None:
    state = window_state(channel, T0, T0 + 10 * WINDOW_MS)
    assert not state.applies
    assert state.open
    assert state.closes_at_ms is None


@given(last=st.integers(0, 2**42), elapsed=st.integers(-(2**30), 2**33))
def test_open_iff_less_than_24h_since_customer_message(last: int, elapsed: int) -> None:
    assert is_window_open(last, last + elapsed) == (elapsed < WINDOW_MS)


async def test_no_closing_notice_for_a_window_closed_already() -> None:
    # A first message redelivered 30 hours late (Meta's retries after an outage) fired its
    # "closing" notice at once, its closes_at in the past.
    events = RecordingTopic()
    handle = window_agent.handlers(cast(Any, events))
    now = datetime.now(UTC)
    written_ms = int((now - timedelta(hours=30)).timestamp() * 1000)
    session = {"tenant_id": str(uuid.uuid4()), "channel": "whatsapp",
               "last_customer_message_ms": written_ms}  # fmt: skip
    for deadline in ("window_closing", "window_expired"):
        fired = DeadlineReached(event_id=str(uuid.uuid4()), tenant_id=session["tenant_id"],
                                occurred_at=now - timedelta(hours=7), lead_id=str(uuid.uuid4()),
                                deadline=deadline, due_ms=0, fired_at=now)  # fmt: skip
        await handle[deadline](b"lead", fired, session)
    assert [json.loads(v)["type"] for v in events.sent] == ["window_expired"]
