"""The customer-service window of Meta's channels (WhatsApp, Instagram, Messenger).

Free-form messages may be sent only while the window is open: for 24 hours after the
*customer's* last message, measured from that message's own timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_MS = 24 * 60 * 60 * 1000
WINDOWED_CHANNELS = frozenset({"whatsapp", "instagram", "facebook"})


@dataclass(frozen=True, slots=True)
class WindowState:
    applies: bool
    open: bool
    closes_at_ms: int | None


def window_closes_at_ms(last_customer_message_ms: int) -> int:
    return last_customer_message_ms + WINDOW_MS


def is_window_open(last_customer_message_ms: int | None, now_ms: int) -> bool:
    """Open if and only if now < last customer message + 24 h."""
    if last_customer_message_ms is None:
        return False
    return now_ms < window_closes_at_ms(last_customer_message_ms)


def window_state(channel: str, last_customer_message_ms: int | None, now_ms: int) -> WindowState:
    if channel not in WINDOWED_CHANNELS:
        return WindowState(applies=False, open=True, closes_at_ms=None)
    closes_at = (
        None if last_customer_message_ms is None else window_closes_at_ms(last_customer_message_ms)
    )
    return WindowState(
        applies=True,
        open=is_window_open(last_customer_message_ms, now_ms),
        closes_at_ms=closes_at,
    )


def window_deadlines(
    channel: str, last_customer_message_ms: int, closing_notice_ms: int
) -> dict[str, int]:
    """The window's deadlines: a notice before it closes, and the close itself."""
    if channel not in WINDOWED_CHANNELS:
        return {}
    closes_at = window_closes_at_ms(last_customer_message_ms)
    return {"window_closing": closes_at - closing_notice_ms, "window_expired": closes_at}
