"""The worker's composition root: the one Faust app, its topics, tables and agents."""

from __future__ import annotations

from typing import Any

import asyncpg
import faust
import mode

from connectors.ai import QualificationAI
from connectors.channels import ChannelDirectory
from connectors.gmail_send import EmailSender
from connectors.gmail_store import GmailStore
from connectors.mailer import Mailer
from connectors.sdrs import SdrRouter
from connectors.sent_messages import SentMessages
from connectors.tenants import TenantSettings
from connectors.whatsapp import GraphApiClient
from flexoraa.crypto import load_secret_box
from flexoraa.db import create_pool
from flexoraa.kafka import KeyPartitioner
from flexoraa.settings import Settings
from schemas.events import InboundMessage
from schemas.messaging import DeliveryStatus, LeadEvent, OutboundMessage
from schemas.tokens import BalanceChangeRecord, TokenUsage
from schemas.topics import TopicNames
from streams import web
from streams.agents import dead_letter_index
from streams.agents import deadlines as deadlines_agent
from streams.agents import leakage as leakage_agent
from streams.agents import notifications as notifications_agent
from streams.agents import outbound as outbound_agent
from streams.agents import qualification as qualification_agent
from streams.agents import recovery as recovery_agent
from streams.agents import sessions as sessions_agent
from streams.agents import sink as sink_agent
from streams.agents import tokens as tokens_agent
from streams.agents import window as window_agent
from streams.agents.deadlines import DeadLettered
from streams.agents.leakage import LeakActions
from streams.agents.notifications import NotificationStore
from streams.agents.outbound import LateWindowResends, ScheduledSends, Sender, SentCommands
from streams.agents.qualification import Interviewer, QualificationTopics
from streams.agents.recovery import Recovery
from streams.agents.sink import SinkSpec
from streams.agents.tokens import Accounts, AiGate, Meter, SeenIds, TenantStatusView
from streams.batches import BatchLane
from streams.monitor import install_prometheus_monitor
from streams.poison import PoisonRecords
from streams.producer import DirectTopic, HeldChangelogTable, WorkerApp
from streams.replay import ReplayingTableManager
from streams.rules.qualification import Policy
from streams.rules.tokens import parse_prices
from streams.sink import (
    DeliveryStatusSink,
    InboundMessageSink,
    LeadEventSink,
    OutboundMessageSink,
    TokenCreditSink,
    TokenUsageSink,
)
from streams.timers import DeadlineIndex, Scheduler


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
    app = WorkerApp(
        settings.topic_prefix,
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        store=settings.table_store,
        datadir=str(datadir),
        autodiscover=False,
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        processing_guarantee=settings.processing_guarantee,
        # Effects skip Faust's per-record send wrapping (streams.producer.DirectTopic).
        Topic=DirectTopic,
        # Table writes skip it too (streams.producer.HeldChangelogTable).
        Table=HeldChangelogTable,
        # Recovery applies a fetch's changelog records in batches (streams.replay).
        TableManager=ReplayingTableManager,
        # An agent that raises stops the worker (non-zero exit, for the supervisor to restart
        # it from the committed offsets). Faust's default restarts only the agent, leaving the
        # record it crashed on unacknowledged: its partition then never commits again and the
        # next rebalance waits for it forever (a silent stall seen in the fault tests).
        agent_supervisor=mode.CrashingSupervisor,
        producer_acks=-1,
        # Kafka's default partitioning, each key's hash remembered (flexoraa.kafka).
        producer_partitioner=KeyPartitioner(),
        # A killed worker's partitions (and their pending deadlines) move to the others only
        # after this; Faust's 60 s default would leave those leads' timers late by a minute.
        broker_session_timeout=settings.worker_session_timeout_s,
        table_standby_replicas=settings.worker_standby_replicas,
        # One inbound message fans out into about a dozen records (changelogs, commands, lead
        # events); without a linger each is its own produce request, and the socket writes
        # alone took the worker's core (measured: 8 s freshness at 200 messages/s).
        producer_linger=settings.worker_producer_linger_ms / 1000,
        producer_max_batch_size=settings.worker_producer_batch_bytes,
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
    app.shutdown_drain_s = settings.worker_shutdown_drain_s
    app.fetch_max_wait_s = settings.worker_fetch_max_wait_ms / 1000
    app.fetch_pacing_s = settings.worker_fetch_pacing_ms / 1000

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
    outbound_commands = lead_topic(names.outbound_commands)
    outbound_messages = lead_topic(names.outbound_messages)
    delivery_status = lead_topic(names.delivery_status)
    lead_events = lead_topic(names.lead_events)
    deadlines_topic = lead_topic(names.deadlines)
    notifications = lead_topic(names.notifications)
    latency = lead_topic(names.latency)
    # Keys are the lead id's bytes, exactly as producers key the lead topics, so the partition
    # of a key is the same murmur2 hash everywhere (the web page routes reads with it; Faust
    # would serialise any other key type with its JSON codec and hash something else).
    sessions = app.Table("sessions", key_type=bytes, partitions=settings.kafka_partitions)
    deadlines = app.Table("deadlines", key_type=bytes, partitions=settings.kafka_partitions)
    scheduler = Scheduler(deadlines, DeadlineIndex())
    pool = _LazyPool(settings)
    # --- Tokens (issue 6): every AI action asks the gate and is charged through the meter ---
    token_usage = lead_topic(names.token_usage)
    token_credits = lead_topic(names.token_credits)
    tenant_status = lead_topic(names.tenant_status)
    status_view = TenantStatusView(
        settings.kafka_bootstrap_servers, names.tenant_status, settings.kafka_partitions
    )
    deferred_ai = app.Table("deferred_ai", key_type=bytes, partitions=settings.kafka_partitions)
    gate = AiGate(status_view, scheduler, deferred_ai, sessions)
    meter = Meter(
        token_usage, parse_prices(settings.token_prices), settings.token_model_tokens_per_token
    )
    token_accounts = app.Table(
        "token_accounts", key_type=bytes, partitions=settings.kafka_partitions
    )
    seen_token_events = SeenIds(
        app.Table("token_seen", key_type=bytes, partitions=settings.kafka_partitions),
        kept_s=settings.token_seen_kept_days * 86_400,
    )
    # The token topics skip Faust's per-record delivery: their handlers take whole fetches.
    # A record failing for what it carries is dead-lettered, not a worker stopped at every
    # restart (streams.poison).
    poison = PoisonRecords(
        dead_letters,
        policy=settings.worker_poison_records,
        is_stopping=lambda: bool(app.should_stop),
        breaker_records=settings.worker_poison_breaker_records,
        breaker_window_s=settings.worker_poison_breaker_window_s,
    )
    batch_lane = BatchLane(guard=poison.handle)
    app.batch_lane = batch_lane
    tokens_agent.register(
        app,
        lane=batch_lane,
        token_topics=[token_usage, token_credits],
        accounts=Accounts(
            accounts=token_accounts,
            seen=seen_token_events,
            status_topic=tenant_status,
            notifications=notifications,
            dead_letters=dead_letters,
            pool=pool,
            published=status_view.status,
        ),
        seen=seen_token_events,
        gate=gate,
        view=status_view,
        deferred=deferred_ai,
        deadlines_topic=deadlines_topic,
        source_topic_name=names.inbound_messages,
        partitions=settings.kafka_partitions,
        batch_max=settings.token_batch_max,
        tick_s=settings.timer_tick_ms / 1000,
    )
    tokens_agent.register_relay(
        app,
        pool=pool,
        credits_topic=token_credits,
        interval_s=settings.outbox_poll_interval_ms / 1000,
    )
    secret_box = load_secret_box(settings)
    channels = ChannelDirectory(pool, secret_box)
    graph = GraphApiClient(settings.whatsapp_graph_api_url, settings.whatsapp_graph_api_version)

    # The inbound topic's agents read it from the batch lane too, record by record: each of
    # its records reaches five agents, and Faust's per-record delivery to each of them cost
    # (bench.throughput: 162 events/s through Faust's streams, 214-251 on the lane).
    lane_max = settings.sink_batch_size
    sessions_agent.register(
        batch_lane,
        inbound=inbound,
        dead_letters=dead_letters,
        sessions=sessions,
        scheduler=scheduler,
        closing_notice_ms=settings.window_closing_notice_min * 60_000,
        max_batch=lane_max,
    )
    # Topics read by sinks (and the token topics) go through the batch lane: whole fetches,
    # not one record at a time through Faust's streams.
    sinks: list[SinkSpec[Any]] = [
        # The sessions agent dead-letters undecodable inbound records; one letter per record.
        SinkSpec(
            "inbound", inbound, InboundMessage, InboundMessageSink(pool), dead_letter_invalid=False
        ),
        # Dead-letters undecodable sent messages (the leakage agent skips them).
        SinkSpec("outbound", outbound_messages, OutboundMessage, OutboundMessageSink(pool)),
        SinkSpec("statuses", delivery_status, DeliveryStatus, DeliveryStatusSink(pool)),
        SinkSpec("lead-events", lead_events, LeadEvent, LeadEventSink(pool)),
        # The account fold dead-letters undecodable token events.
        SinkSpec("token-usage", token_usage, TokenUsage, TokenUsageSink(pool),
                 dead_letter_invalid=False),
        SinkSpec("token-credits", token_credits, BalanceChangeRecord, TokenCreditSink(pool),
                 dead_letter_invalid=False),
    ]  # fmt: skip
    for spec in sinks:
        sink_agent.register(
            batch_lane,
            spec,
            dead_letters=dead_letters,
            batch_size=settings.sink_batch_size,
            batch_window_s=settings.sink_batch_window_ms / 1000,
        )
    # The letters and their replays, for the API (a tenant's admins see their own).
    dead_letter_index.register(
        app,
        batch_lane,
        pool,
        letters=dead_letters,
        marks=lead_topic(names.dead_letters_replayed),
        kept_days=settings.dead_letters_kept_days,
        batch_size=settings.sink_batch_size,
        batch_window_s=settings.sink_batch_window_ms / 1000,
    )

    # --- WhatsApp and Meta channels (issue 3) ---
    email = EmailSender(settings, GmailStore(pool, secret_box))
    sent = SentCommands(
        app.Table("outbound_sent", key_type=bytes, partitions=settings.kafka_partitions)
    )
    sender = Sender(settings, graph, channels, outbound_messages, latency, email, sent)
    scheduled = ScheduledSends(
        app.Table("scheduled", key_type=bytes, partitions=settings.kafka_partitions),
        scheduler,
        outbound_commands,
        sent,
    )
    resends = LateWindowResends(
        SentMessages(pool),
        outbound_commands,
        template_configured=settings.whatsapp_template_name is not None,
    )
    outbound_agent.register(
        app,
        outbound_commands=outbound_commands,
        dead_letters=dead_letters,
        sessions=sessions,
        sender=sender,
        scheduled=scheduled,
        resends=resends,
        concurrency=settings.outbound_concurrency,
        poison=poison,
    )
    outbound_agent.register_resends(
        batch_lane, delivery_status=delivery_status, resends=resends, max_batch=lane_max
    )
    deadline_handlers = window_agent.handlers(lead_events) | scheduled.handlers()
    # What a kind of deadline does when one of its own is dead-lettered (streams.poison).
    dead_lettered: dict[str, DeadLettered] = scheduled.dead_lettered()
    # --- AI qualification (issue 4) ---
    # Customer messages read this late are recorded, not acted on (streams.rules.session).
    stale_after_ms = settings.inbound_stale_after_s * 1000
    qualification = app.Table("qualification", key_type=bytes, partitions=settings.kafka_partitions)
    router = SdrRouter(pool)
    tenants = TenantSettings(pool, settings.leak_threshold_s, ttl_s=settings.tenant_settings_ttl_s)
    if settings.enable_ai_qualification:
        qualification_agent.register(
            batch_lane,
            inbound=inbound,
            qualification=qualification,
            interviewer=Interviewer(
                QualificationAI(settings),
                router,
                Policy(
                    budget_threshold=settings.qualification_budget_threshold,
                    budget_currency=settings.qualification_budget_currency,
                    escalation_days=settings.qualification_escalation_days,
                ),
                tenants,
                QualificationTopics(
                    lead_events=lead_events,
                    outbound_commands=outbound_commands,
                    notifications=notifications,
                    latency=latency,
                ),
                gate,
                meter,
                stale_after_ms=stale_after_ms,
                email_configured=settings.gmail_configured,
            ),
            gate=gate,
            max_batch=lane_max,
        )
    # --- Leakage prevention (issue 5) ---
    leakage = app.Table("leakage", key_type=bytes, partitions=settings.kafka_partitions)
    if settings.enable_leakage_prevention:
        leakage_agent.register(
            batch_lane,
            inbound=inbound,
            outbound_messages=outbound_messages,
            lead_events=lead_events,
            leakage=leakage,
            scheduler=scheduler,
            tenants=tenants,
            max_batch=lane_max,
            stale_after_ms=stale_after_ms,
        )
        leak_actions = LeakActions(
            leakage=leakage,
            qualification=qualification,
            router=router,
            lead_events=lead_events,
            outbound_commands=outbound_commands,
            notifications=notifications,
            gate=gate,
            meter=meter,
            tenants=tenants,
            scheduler=scheduler,
            email_configured=settings.gmail_configured,
        )
        deadline_handlers |= leak_actions.handlers()
        dead_lettered |= leak_actions.dead_lettered()
    if settings.enable_cold_recovery:
        recovery = Recovery(
            table=app.Table("recovery", key_type=bytes, partitions=settings.kafka_partitions),
            qualification=qualification,
            scheduler=scheduler,
            tenants=tenants,
            lead_events=lead_events,
            outbound_commands=outbound_commands,
            silence_ms=settings.recovery_silence_s * 1000,
            delays_s=tuple(int(d) for d in settings.recovery_delays_s.split(",")),
            local_hour=settings.recovery_local_hour,
            gate=gate,
            meter=meter,
            template_configured=settings.whatsapp_template_name is not None,
            stale_after_ms=stale_after_ms,
            email_configured=settings.gmail_configured,
        )
        recovery_agent.register(batch_lane, inbound=inbound, recovery=recovery, max_batch=lane_max)
        deadline_handlers |= recovery.handlers()
        dead_lettered |= recovery.dead_lettered()
    deadline_handlers |= gate.handlers()
    dead_lettered |= gate.dead_lettered()
    deadlines_agent.register(
        app,
        source_topic=inbound,
        deadlines_topic=deadlines_topic,
        dead_letters=dead_letters,
        scheduler=scheduler,
        sessions=sessions,
        handlers=deadline_handlers,
        partitions=settings.kafka_partitions,
        tick_s=settings.timer_tick_ms / 1000,
        poison=poison,
        dead_lettered=dead_lettered,
    )
    # --- Tokens and notifications (issue 6) ---
    notifications_agent.register(
        app,
        notifications=notifications,
        dead_letters=dead_letters,
        store=NotificationStore(pool),
        mailer=Mailer(settings),
        gmail=email,
        batch_size=settings.sink_batch_size,
        batch_window_s=settings.sink_batch_window_ms / 1000,
        poison=poison,
    )
    # --- SLA monitoring (issue 8) ---
    if settings.enable_sla_monitoring:
        from streams.agents import sla as sla_agent

        sla_agent.install(
            app,
            batch_lane,
            settings,
            pool=pool,
            dead_letters=dead_letters,
            latency=latency,
            notifications=notifications,
            max_batch=lane_max,
        )
    batch_lane.attach(app)
    web.register(
        app,
        sessions=sessions,
        qualification=qualification,
        token_accounts=token_accounts,
        deferred_ai=deferred_ai,
        partitions=settings.kafka_partitions,
        tenant_statuses_loaded=status_view.is_loaded,
    )
    install_prometheus_monitor(app)

    # mode's handler type spells the `signal` argument's type as a string no signature matches.
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def drain_before_recovery(sender: Any, *revoked: Any, **kwargs: Any) -> None:
        # Recovery rebuilds a partition's table from its changelog: every write must be in it.
        await app.producer.flush()

    return app
