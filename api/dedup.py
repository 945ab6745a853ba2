"""A bounded memory of recently accepted channel message ids (one API process).

Meta retries a webhook that did not get a 2xx, sometimes minutes later; most retries reach the
same process, which then produces nothing. A retry that reaches another replica produces an
event with the same deterministic event id, which every consumer applies once.
"""

from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def add(self, message_id: str) -> None:
        if self._capacity <= 0:
            return
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
