"""Cold-lead recovery: a short sequence of AI messages at the tenant's local morning.

A lead whose temperature is COLD and who has been silent for 24 hours enters recovery. Step
k is sent `delays_s[k]` seconds after recovery starts, moved to the next `local_hour` in the
tenant's time zone (people answer in their morning, not at 03:00). A reply ends it (success);
so does a silence after the last step.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

SILENCE_MS = 24 * 60 * 60 * 1000

# The seed's order: re-engagement, curiosity, educational, soft call to action.
STRATEGIES = ("re_engagement", "curiosity", "educational", "soft_cta")
MESSAGES = {
    "re_engagement": "Hi {name}, we spoke a little while ago — is finding the right tool still "
    "on your list? Happy to pick up where we left off.",
    "curiosity": "Hi {name}, three things are changing how teams like yours answer leads this "
    "year. Want me to share what we're seeing?",
    "educational": "Hi {name}, here's what we see working: replying within five minutes "
    "doubles conversion. Glad to show you how others set that up.",
    "soft_cta": "Hi {name}, should I keep sending you the occasional insight, or is now not "
    "the right time? Either answer is fine.",
}


def known_zone(time_zone: str) -> ZoneInfo | None:
    """The IANA zone of that name, or None if this machine's tz database has none. A name that
    is a directory of the database ("America") or too long for a path raises an OSError, which
    the agents' retry loop took for an unreachable database and retried for ever."""
    try:
        return ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def zone_or_utc(time_zone: str) -> ZoneInfo:
    """The zone, or UTC if this machine's tz database lacks it: the API checks a zone when it
    is set, but a row written another way (or a zone a tzdata update dropped, or one stored in
    a recovery state before) failed every recovery step of the tenant's leads."""
    return known_zone(time_zone) or ZoneInfo("UTC")


def next_local_hour(after_ms: int, time_zone: str, hour: int) -> int:
    """The first `hour`:00 in `time_zone` at or after `after_ms` (epoch ms)."""
    zone = zone_or_utc(time_zone)
    local = datetime.fromtimestamp(after_ms / 1000, tz=zone)
    candidate = local.replace(hour=hour, minute=0, second=0, microsecond=0)
    if candidate < local:
        candidate += timedelta(days=1)
        # Re-anchor on the wall clock: a DST change must not shift the hour.
        candidate = candidate.replace(hour=hour)
    return int(candidate.timestamp() * 1000)


def step_due_ms(
    started_ms: int, step: int, delays_s: tuple[int, ...], time_zone: str, hour: int | None
) -> int:
    due = started_ms + delays_s[step] * 1000
    return due if hour is None else next_local_hour(due, time_zone, hour)


def next_step_due_ms(
    started_ms: int,
    step: int,
    sent_ms: int,
    delays_s: tuple[int, ...],
    time_zone: str,
    hour: int | None,
) -> int:
    """When step `step` (after the first) is due: at its time in the sequence, but never sooner
    after the step before it, sent at `sent_ms`, than the sequence spaces the two, and at the
    tenant's local hour. A sequence held up (a tenant without tokens for days) goes on at its
    own pace, instead of sending its overdue steps at once, one after the other."""
    planned = started_ms + delays_s[step] * 1000
    spaced = sent_ms + (delays_s[step] - delays_s[step - 1]) * 1000
    if hour is None:
        return max(planned, spaced)
    # The spacing counts from a send a little after its hour began (a timer tick, the work):
    # it ends within the same hour, days later, not past it (a day late at every step).
    return max(
        next_local_hour(planned, time_zone, hour),
        local_hour_window_start(spaced, time_zone, hour),
    )


def local_hour_window_start(now_ms: int, time_zone: str, hour: int) -> int:
    """The start of the `hour` now running in `time_zone`, or of the next one: a step resumed
    outside its hour (tokens bought at 23:00) waits for it, as the sequence promises."""
    return next_local_hour(now_ms - 3_600_000 + 1, time_zone, hour)


def recovery_text(step: int, contact_name: str | None) -> str:
    return MESSAGES[STRATEGIES[step]].format(name=contact_name or "there")
