"""What a CreateTopics answer did per topic: the admin client raises for none of it."""

from __future__ import annotations

from flexoraa.kafka import _creation_answer


def test_each_topic_is_created_pending_or_refused() -> None:
    answer = _creation_answer(
        [
            ("a", 0, None),
            ("b", 36, "Topic 'b' already exists."),  # another process made it meanwhile
            ("c", 7, "timed out"),  # REQUEST_TIMED_OUT: it may exist in a moment
            ("d", 38, "Replication factor: 2 larger than available brokers: 1."),
        ]
    )
    assert answer.created == ["a"]
    assert answer.pending == ["c"]
    assert answer.refused == [
        "d: InvalidReplicationFactorError (Replication factor: 2 larger than available brokers: 1.)"
    ]
