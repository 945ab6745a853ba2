"""Every Faust table of the worker has its changelog among the topics the stack creates."""

from __future__ import annotations

import faust

from flexoraa.settings import Settings
from schemas.topics import TABLES, TopicNames


def test_every_worker_table_has_its_changelog_created_with_the_topics(
    worker_app: faust.App, worker_settings: Settings
) -> None:
    names = TopicNames(worker_settings.topic_prefix)
    changelogs = {table.changelog_topic.get_topic_name() for table in worker_app.tables.values()}
    assert changelogs == set(names.changelogs())
    assert set(names.changelogs()) <= set(names.all()) & names.compacted()
    assert len(TABLES) == len(worker_app.tables)
