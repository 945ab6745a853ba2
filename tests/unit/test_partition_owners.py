"""Which worker serves a lead's live read (streams.web.PartitionOwners)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from streams.web import PartitionOwners

SESSIONS = cast(Any, SimpleNamespace(name="sessions"))
OWN = "http://127.0.0.1:6066"
OTHER = "http://10.0.0.2:6066"


class _Worker:
    """A stand-in for the Faust app: its URL, its assignor's distribution and its router."""

    def __init__(self, distribution: dict[str, dict[str, set[int]]]) -> None:
        self.conf = SimpleNamespace(canonical_url=OWN)
        self.distribution = distribution
        self.assignor = SimpleNamespace(tables_metadata=lambda: self.distribution)
        self.router = SimpleNamespace(table_metadata=self._table_metadata)
        self.lookups = 0

    def _table_metadata(self, name: str) -> dict[str, dict[str, set[int]]]:
        self.lookups += 1
        return self.distribution


def test_own_partitions_are_none_and_the_others_their_workers_url() -> None:
    worker = _Worker(
        {OWN + "/": {"sessions-changelog": {0, 1}}, OTHER: {"sessions-changelog": {2}}}
    )
    owners = PartitionOwners(cast(Any, worker), SESSIONS)
    # The same host and port is this worker, however the URL is spelled.
    assert owners() == {0: None, 1: None, 2: OTHER}


def test_owners_are_worked_out_again_only_after_a_new_assignment() -> None:
    worker = _Worker({OWN: {"sessions-changelog": {0, 1, 2}}})
    owners = PartitionOwners(cast(Any, worker), SESSIONS)
    for _ in range(5):
        assert owners() == {0: None, 1: None, 2: None}
    assert worker.lookups == 1
    # A rebalance: Faust's assignor holds a new distribution, and partition 2 moved.
    worker.distribution = {OWN: {"sessions-changelog": {0, 1}}, OTHER: {"sessions-changelog": {2}}}
    assert owners() == {0: None, 1: None, 2: OTHER}
    assert worker.lookups == 2
