"""The worker's composition root: the one Faust app, its topics, tables and agents."""

from __future__ import annotations

import asyncpg
import faust
from faust.sensors.prometheus import setup_prometheus_sensors

from flexoraa.db import create_pool
from flexoraa.settings import Settings
from schemas.topics import TopicNames
from streams import web
from streams.agents import sessions as sessions_agent
from streams.agents import sink as sink_agent
from streams.sink import InboundMessageSink


class _LazyPool:
    """The asyncpg pool, created on first use inside the worker's running loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None

    async def __call__(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await create_pool(self._settings)
        return self._pool


def create_worker_app(settings: Settings) -> faust.App:
    names = TopicNames(settings.topic_prefix)
    datadir = settings.stack_dir / "workers" / f"{settings.topic_prefix}-{settings.worker_web_port}"
    # Faust creates only the last level of its data directory.
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.topic_prefix,
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        store=settings.table_store,
        datadir=str(datadir),
        autodiscover=False,
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        processing_guarantee=settings.processing_guarantee,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        web_enabled=True,
        web_host=settings.worker_web_host,
        web_port=settings.worker_web_port,
        canonical_url=settings.worker_advertised_url,
        web_in_thread=False,
        # Faust's table browser would show any lead's state to whoever reaches the port.
        web_tables_enabled=False,
        web_graph_enabled=False,
    )

    def lead_topic(name: str) -> faust.TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.kafka_partitions,
        )

    inbound = lead_topic(names.inbound_messages)
    dead_letters = lead_topic(names.dead_letters)
    # Keys are the lead id's bytes, exactly as producers key the lead topics: Faust picks a
    # table's key codec from its key type (raw only for bytes), and table_route hashes the
    # key with that codec, so any other type would route reads to the wrong partition owner.
    sessions = app.Table("sessions", key_type=bytes, partitions=settings.kafka_partitions)

    sessions_agent.register(app, inbound=inbound, dead_letters=dead_letters, sessions=sessions)
    sink_agent.register(
        app,
        inbound=inbound,
        dead_letters=dead_letters,
        sink=InboundMessageSink(_LazyPool(settings)),
        batch_size=settings.sink_batch_size,
        batch_window_s=settings.sink_batch_window_ms / 1000,
    )
    # --- WhatsApp and Meta channels (issue 3) ---
    # --- Tokens and notifications (issue 6) ---
    # --- SLA monitoring (issue 8) ---
    web.register(app, sessions=sessions, partitions=settings.kafka_partitions)
    setup_prometheus_sensors(app, name_prefix="faust")
    return app
