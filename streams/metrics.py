"""Prometheus metrics of the worker (exported on its `/metrics` page with Faust's own)."""

from prometheus_client import Counter, Gauge

from streams.rules.recovery import STRATEGIES

INBOUND_EVENTS = Counter(
    "flexoraa_inbound_events",
    "Inbound customer messages applied to the sessions table",
    ["channel"],
)
DUPLICATE_EVENTS = Counter(
    "flexoraa_duplicate_events",
    "Events skipped because their event id was already applied",
    ["topic"],
)
DEAD_LETTERS = Counter("flexoraa_dead_letters", "Records sent to the dead-letter topic", ["reason"])
SINK_ROWS = Counter("flexoraa_sink_rows", "Rows written to PostgreSQL by the sink", ["table"])
DEAD_LETTERS_UNINDEXED = Counter(
    "flexoraa_dead_letters_unindexed",
    "Records of the dead-letter and marks topics not stored for the API: no letter or mark "
    "(undecodable), a row PostgreSQL refused (refused), or a write that failed (failed: a "
    "missing table, a permission)",
    ["reason"],
)
# A send waits when its partition's batch is full until aiokafka's sender takes the batch,
# which it does only between two requests to the broker (or while its topic's metadata is
# unknown): the agent or changelog round sending stops meanwhile.
PRODUCER_BLOCKED = Counter(
    "flexoraa_producer_blocked_seconds",
    "Time the worker's sends waited for the producer to take a record (a partition's batch "
    "full, or the topic's metadata unknown)",
)
CHANGELOG_RECORDS_REPLAYED = Counter(
    "flexoraa_changelog_records_replayed",
    "Changelog records applied to the worker's tables while recovering them",
)
SINK_RETRIES = Counter("flexoraa_sink_retries", "PostgreSQL sink writes retried after a failure")
DEADLINES_FIRED = Counter("flexoraa_deadlines_fired", "Per-lead deadlines acted on", ["deadline"])
OUTBOUND_SENDS = Counter(
    "flexoraa_outbound_sends",
    "Send attempts by channel, kind and outcome",
    ["channel", "kind", "outcome"],
)
QUALIFICATION_STEPS = Counter(
    "flexoraa_qualification_steps",
    "Qualification interview steps by extraction source and resulting status",
    ["source", "status"],
)
LEAKS = Counter(
    "flexoraa_leaks", "Leads that waited past their reply deadline", ["temperature", "action"]
)
RECOVERY = Counter(
    "flexoraa_recovery",
    "Cold-recovery messages sent, and replies to the last message sent, per strategy (step)",
    ["strategy", "outcome"],
)

# Label sets known up front are exported at zero from the start, so a dashboard or alert shows
# "none yet" instead of "no data".
for _kind in ("invalid_event", "wrong_key", "sink_rejected"):
    DEAD_LETTERS.labels(_kind)
for _table in ("leads", "messages", "outbound_messages", "message_statuses", "lead_events",
               "dead_letters"):  # fmt: skip
    SINK_ROWS.labels(_table)
for _reason in ("undecodable", "refused", "failed"):
    DEAD_LETTERS_UNINDEXED.labels(_reason)
for _temperature, _action in (
    ("HOT", "ai_reengagement"),
    ("WARM", "reassign"),
    ("COLD", "escalate_admins"),
):
    LEAKS.labels(_temperature, _action)
for _strategy in STRATEGIES:
    for _outcome in ("attempt", "replied"):
        RECOVERY.labels(_strategy, _outcome)
for _deadline in ("leak", "window_closing", "window_expired", "scheduled", "silence", "recovery"):
    DEADLINES_FIRED.labels(_deadline)
for _source in ("builtin", "model"):
    for _status in ("in_progress", "completed"):
        QUALIFICATION_STEPS.labels(_source, _status)
for _channel in ("whatsapp", "instagram", "facebook"):
    for _kind in ("freeform", "template"):
        for _outcome in ("accepted", "retrying", "failed"):
            OUTBOUND_SENDS.labels(_channel, _kind, _outcome)
NOTIFICATIONS = Counter(
    "flexoraa_notifications", "Notifications delivered by channel", ["category", "delivery"]
)
TOKEN_EVENTS = Counter(
    "flexoraa_token_events", "Token usage, credit and debit events applied to accounts", ["kind"]
)
TOKEN_BALANCE = Gauge("flexoraa_token_balance", "Token balance per tenant", ["tenant_id"])
TOKEN_CYCLE_USED_PERCENT = Gauge(
    "flexoraa_token_cycle_used_percent",
    "Share of the tokens available at the last top-up already used",
    ["tenant_id"],
)
TOKEN_TENANT_PAUSED = Gauge(
    "flexoraa_token_tenant_paused", "1 while a tenant has no tokens (AI paused)", ["tenant_id"]
)
AI_ACTIONS_DEFERRED = Counter(
    "flexoraa_ai_actions_deferred", "AI actions kept for later: the tenant had no tokens", ["kind"]
)
for _kind in ("usage", "credit", "debit", "duplicate"):
    TOKEN_EVENTS.labels(_kind)
SINK_ROWS.labels("token_ledger")
for _kind in ("qualification", "recovery"):
    AI_ACTIONS_DEFERRED.labels(_kind)
DEADLINES_FIRED.labels("ai_resume")
FETCHED_PARTITIONS = Gauge(
    "flexoraa_consumer_fetched_partitions",
    "Assigned partitions the worker's Kafka consumer fetches (not paused), by kind",
    ["kind"],
)
FETCH_MIN_BYTES = Gauge(
    "flexoraa_consumer_fetch_min_bytes",
    "Bytes the worker's fetches ask the broker to wait for (WORKER_FETCH_PACING_MS)",
)
POISON_BREAKER_TRIPS = Counter(
    "flexoraa_poison_breaker_trips",
    "Times a worker stopped because too many records failed at once (streams.poison)",
)
