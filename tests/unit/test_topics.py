"""Every Faust table of the worker has its changelog among the topics the stack creates."""

from __future__ import annotations

from pathlib import Path

from flexoraa.settings import Settings
from schemas.topics import TABLES, TopicNames
from streams.app import create_worker_app


def test_every_worker_table_has_its_changelog_created_with_the_topics(tmp_path: Path) -> None:
    settings = Settings(topic_prefix="unit-topics", stack_dir=tmp_path)
    app = create_worker_app(settings)
    names = TopicNames(settings.topic_prefix)
    changelogs = {table.changelog_topic.get_topic_name() for table in app.tables.values()}
    assert changelogs == set(names.changelogs())
    assert set(names.changelogs()) <= set(names.all()) & names.compacted()
    assert len(TABLES) == len(app.tables)
