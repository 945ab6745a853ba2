from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from streams.rules.session import RECENT_IDS_KEPT, SessionState, apply_inbound

BASE: dict[str, Any] = {
    "lead_id": "lead-1",
    "tenant_id": "tenant-1",
    "channel": "whatsapp",
    "contact": "919800000001",
}


def apply(state: SessionState | None, event_id: str, at: int, name: str | None = None) -> Any:
    return apply_inbound(state, event_id=event_id, occurred_ms=at, contact_name=name, **BASE)


def test_first_message_opens_a_session() -> None:
    state = apply(None, "e1", 1_000, "Asha")
    assert state["message_count"] == 1
    assert state["first_message_ms"] == state["last_customer_message_ms"] == 1_000
    assert state["contact_name"] == "Asha"


def test_a_repeated_event_is_not_applied_twice() -> None:
    state = apply(None, "e1", 1_000)
    assert apply(state, "e1", 1_000) is None


def test_out_of_order_messages_keep_the_latest_customer_time() -> None:
    state = apply(None, "e2", 5_000)
    state = apply(state, "e1", 1_000)
    assert state["first_message_ms"] == 1_000
    assert state["last_customer_message_ms"] == 5_000
    assert state["message_count"] == 2


def test_contact_name_is_kept_when_a_later_message_has_none() -> None:
    state = apply(apply(None, "e1", 1, "Asha"), "e2", 2, None)
    assert state["contact_name"] == "Asha"


def test_recent_ids_are_bounded() -> None:
    state = None
    for i in range(RECENT_IDS_KEPT * 3):
        state = apply(state, f"e{i}", i)
    assert state is not None
    assert len(state["recent_event_ids"]) == RECENT_IDS_KEPT
    assert state["message_count"] == RECENT_IDS_KEPT * 3


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10**6)), min_size=1, max_size=40),
    st.randoms(),
)
def test_duplicates_and_order_do_not_change_the_result(
    events: list[tuple[int, int]], rng: Any
) -> None:
    # The same event id always carries the same time, as a retried delivery does.
    times = {f"e{n}": at for n, at in events}
    deliveries = [(event_id, times[event_id]) for event_id in (f"e{n}" for n, _ in events)]
    shuffled = list(deliveries)
    rng.shuffle(shuffled)

    def run(sequence: list[tuple[str, int]]) -> Any:
        state = None
        for event_id, at in sequence:
            state = apply(state, event_id, at) or state
        return state

    in_order, out_of_order = run(deliveries), run(shuffled)
    assert in_order["message_count"] == out_of_order["message_count"] == len(times)
    assert in_order["last_customer_message_ms"] == out_of_order["last_customer_message_ms"]
    assert in_order["first_message_ms"] == out_of_order["first_message_ms"] == min(times.values())
