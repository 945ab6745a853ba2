"""Delivery statuses: which report wins when they arrive out of order.

Meta does not guarantee order. Statuses are applied in timestamp order, `read` is final (a late
`delivered` never overwrites it) and a message never goes back from `delivered` to `sent`.
"""

from __future__ import annotations

from datetime import datetime

# At the same timestamp, the further state wins.
RANK = {"sent": 0, "delivered": 1, "failed": 2, "read": 3}


def supersedes(
    current_status: str | None, current_at: datetime | None, new_status: str, new_at: datetime
) -> bool:
    """Whether a newly received status replaces the current one."""
    if current_status is None or current_at is None:
        return True
    if current_status == "read":
        return False
    if new_status == "read":
        return True
    if new_at < current_at:
        return False
    if new_at == current_at:
        return RANK[new_status] > RANK[current_status]
    return not (current_status == "delivered" and new_status == "sent")
