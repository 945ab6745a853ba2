"""The one settings object of the platform.

Every process (worker, API, CLI) builds a `Settings` once at start-up and passes it on
explicitly; no other module reads the environment.
"""

from __future__ import annotations

import socket
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args

from limits import parse_many
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.tokens import Feature
from streams.rules.sending import template_fields

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Configuration read from environment variables (and an optional `.env` file)."""

    # "none" in the environment unsets an optional setting (e.g. RECOVERY_LOCAL_HOUR=none).
    # An empty variable counts as unset (compose passes `${RAZORPAY_KEY_ID:-}` as "").
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", env_parse_none_str="none", env_ignore_empty=True
    )

    environment: Literal["development", "test", "production"] = Field(
        "development", description="production refuses development-only defaults"
    )
    log_level: str = Field("INFO", description="log level of worker and API")

    # Kafka
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma separated"
    )
    kafka_partitions: int = Field(
        8, ge=1, description="partitions of every lead-keyed topic (all co-partitioned)"
    )
    kafka_replication_factor: int = Field(1, ge=1, description="replication of created topics")
    # Kafka never compacts a log's newest segment, and by default a segment rolls after 7 days
    # or 1 GiB: a worker's tables (memory://) replay every write of that span at each start.
    changelog_segment_ms: int = Field(
        600_000,
        ge=1000,
        description="a compacted topic's (table changelogs, tenant-status) newest segment rolls "
        "after this long, so compaction bounds a restarted worker's replay to the live keys "
        "plus about this much history",
    )
    changelog_segment_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="...or once it holds this many bytes, whichever comes first",
    )
    kafka_produce_timeout_ms: int = Field(
        5000, ge=100, description="how long the API waits for Kafka's ack before answering 503"
    )
    topic_prefix: str = Field(
        "flexoraa",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="prefix of every topic; also the Faust app id and consumer group",
    )

    # PostgreSQL
    database_url: str = Field(
        "postgresql://flexoraa@127.0.0.1:55432/flexoraa", description="PostgreSQL DSN"
    )
    database_pool_max: int = Field(10, ge=1, description="connections per process")

    # Worker
    worker_web_host: str = Field("127.0.0.1", description="host the worker's web server binds")
    worker_web_port: int = Field(6066, description="port of the worker's web server")
    worker_canonical_url: str | None = Field(
        None,
        description="URL other workers use to reach this one (default http://WORKER_WEB_HOST:PORT,"
        " this machine's address when WORKER_WEB_HOST is 0.0.0.0 or ::)",
    )
    worker_url: str = Field(
        "http://127.0.0.1:6066",
        description="where the API reads live table state (any worker; it routes to the owner)",
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="Faust processing guarantee; effects are idempotent by event id either way",
    )
    worker_session_timeout_s: float = Field(
        10.0, ge=6, le=300, description="a worker silent this long loses its partitions"
    )
    worker_poison_records: Literal["dead_letter", "stop"] = Field(
        "dead_letter",
        description="an agent's record whose handling fails for a reason of its own (a value "
        "the code cannot work with, data PostgreSQL refuses): dead_letter = to the dead-letter "
        "topic with the error, the agent goes on; stop = the worker stops (and meets the record "
        "again after a restart). Any other failure (Kafka, PostgreSQL down or read-only, a "
        "deadlock, a missing table) always stops the worker; the sinks always reject the rows "
        "PostgreSQL refuses",
    )
    worker_poison_breaker_records: int = Field(
        200,
        ge=0,
        description="past this many records dead-lettered within WORKER_POISON_BREAKER_WINDOW_S"
        " a worker stops instead (a deployment's failure, not the records'); 0: no breaker",
    )
    worker_poison_breaker_window_s: float = Field(
        60.0, gt=0, description="the window WORKER_POISON_BREAKER_RECORDS counts letters in"
    )
    worker_shutdown_drain_s: float = Field(
        20.0,
        gt=0,
        description="longest wait, when a worker stops, for its agents to finish the records "
        "they hold (the rest are read again after a restart)",
    )
    worker_fetch_max_wait_ms: int = Field(
        25,
        ge=1,
        le=1500,
        description="longest time the broker holds a worker's fetch when nothing new arrived; "
        "partitions whose records are not yet handled wait up to this long for the next fetch",
    )
    worker_fetch_pacing_ms: float = Field(
        10,
        ge=0,
        le=1000,
        description="each worker fetch asks the broker to wait for about this long of what the "
        "worker has been reading (never past WORKER_FETCH_MAX_WAIT_MS): a busy worker makes "
        "fewer, fuller fetches, for that wait on each hop, and an idle one asks for a byte; 0 "
        "takes whatever is there, as many fetches as the worker can make",
    )
    worker_event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="the worker's event loop; uvloop spends about half asyncio's time per wake-up",
    )
    gc_gen0_threshold: int = Field(
        20_000,
        ge=700,
        description="allocations between two young-generation garbage collections in the "
        "worker and the API; at Python's 700 collecting took 4 % of a busy worker's CPU and, "
        "with requests queueing in the API, 63 full collections (4.3 s) in 20 s at 1,000 "
        "messages/s; at 20,000, 2.7-3.8 % and none, each young collection holding the worker "
        "5-18 ms (100,000: 0.9 %, 49 ms each; 5,000: 3-4 ms each, three times the time)",
    )
    worker_producer_linger_ms: int = Field(
        5, ge=0, le=1000, description="how long the worker's producer gathers records per request"
    )
    worker_producer_batch_bytes: int = Field(
        512 * 1024,
        ge=16 * 1024,
        # A batch is one record batch to the broker, which refuses one over message.max.bytes
        # (1,048,588 by default).
        le=1_000_000,
        description="most bytes a worker's producer gathers per partition before a send waits; "
        "a tenant's token usage all goes to one partition, and at Faust's 16 KiB its batch "
        "filled while the producer waited on the broker, holding every AI step 0.1-0.3 s "
        "(600 messages/s, one tenant)",
    )
    table_store: str = Field(
        "memory://", description="Faust table store; memory:// rebuilds tables from changelogs"
    )
    worker_standby_replicas: int = Field(
        0,
        ge=0,
        description="copies each worker keeps of other workers' table partitions; used on a "
        "takeover only by a store that keeps changelog offsets (not memory://)",
    )
    sink_batch_size: int = Field(
        500,
        ge=1,
        description="rows per PostgreSQL sink write; records a lane handler takes at once",
    )
    sink_batch_window_ms: int = Field(
        200,
        ge=1,
        description="longest wait to fill a batch of PostgreSQL rows (the sinks) or of "
        "notifications",
    )
    token_seen_kept_days: int = Field(
        7,
        ge=1,
        le=365,
        description="days a worker remembers applied token event ids, to ignore one published "
        "again at a new offset (replays are recognised by offset, for ever)",
    )
    dead_letters_kept_days: int = Field(
        30,
        ge=1,
        le=3650,
        description="days the dead letters stay in PostgreSQL for `GET /api/dead-letters` "
        "(they hold the tenants' records); the topic keeps them as long as its retention",
    )

    # API
    api_host: str = Field("127.0.0.1", description="host the API binds")
    api_port: int = Field(8000, description="port of the API")
    max_body_bytes: int = Field(65536, ge=1024, description="largest accepted request body")
    api_producer_linger_ms: int = Field(
        2,
        ge=0,
        le=100,
        description="under load (a record sent within this long of the one before) the API's "
        "producer gathers records this long, so concurrent requests share a produce request; "
        "a lone request's record is sent at once; 0 sends every record at once",
    )
    request_body_timeout_s: float = Field(
        10.0, gt=0, description="time a client has to send a whole request body (else 408)"
    )
    api_rate_limit: str = Field(
        "1000/second;30000/minute",
        description="requests per API key (limits notation, ';'-separated), per API process",
    )
    webhook_rate_limit: str = Field(
        "2000/second", description="webhook requests per sender address, per API process"
    )
    auth_failure_rate_limit: str = Field(
        "30/minute",
        description="unknown or revoked API keys tried per client address, per API process; "
        "past it the address's uncached keys get 429 before any database lookup",
    )
    api_key_cache_ttl_s: float = Field(
        30.0, ge=0, description="how long a verified API key is cached (revocation delay)"
    )

    # Feature flags of the background capabilities (as the seed has).
    enable_ai_qualification: bool = Field(True, description="run the AI qualification interview")
    enable_cold_recovery: bool = Field(True, description="run cold-lead recovery sequences")
    enable_leakage_prevention: bool = Field(True, description="run lead leakage timers")
    enable_sla_monitoring: bool = Field(True, description="compute SLA windows and violations")
    enable_gmail_polling: bool = Field(True, description="poll connected Gmail mailboxes")

    # Local stack (`flexoraa stack`): where servers keep data and where downloads are cached.
    stack_dir: Path = Field(PROJECT_ROOT / ".stack", description="data, logs and pids of the stack")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "flexoraa", description="Kafka jars resolved by Maven"
    )
    kafka_version: str = Field("3.9.1", description="Apache Kafka broker version of the stack")
    kafka_controller_port: int = Field(9093, description="KRaft controller port of the stack")
    postgres_port: int = Field(55432, description="port of the stack's PostgreSQL")

    # --- Notifications: SMTP mailer ---
    smtp_host: str | None = Field(
        None, description="SMTP server for notification e-mails (unset: in-app only)"
    )
    smtp_port: int = Field(587, description="SMTP port")
    smtp_username: str | None = Field(None, description="SMTP login")
    smtp_password: SecretStr | None = Field(None, description="SMTP password")
    smtp_from: str = Field("Flexoraa <alerts@localhost>", description="From: of notification mail")
    smtp_starttls: bool = Field(True, description="upgrade the SMTP connection with STARTTLS")
    smtp_timeout_s: float = Field(10.0, gt=0, description="SMTP connection and send timeout")

    # --- WhatsApp and Meta channels (issue 3) ---
    secrets_encryption_key: SecretStr | None = Field(
        None,
        description="base64 of 32 random bytes: AES-GCM key of stored channel and OAuth secrets "
        "(required in production; locally generated into STACK_DIR/secrets.key)",
    )
    whatsapp_graph_api_url: str = Field(
        "https://graph.facebook.com", description="Graph API base URL (tests use a local server)"
    )
    whatsapp_graph_api_version: str = Field("v21.0", description="Graph API version")
    whatsapp_template_name: str | None = Field(
        None, description="approved template sent outside the 24-hour window (none: fail)"
    )
    whatsapp_template_language: str = Field("en_US", description="language code of the template")
    whatsapp_template_parameters: str = Field(
        "contact_name,text",
        description="comma-separated body parameters of the template, in order, from: "
        "contact_name, text, contact",
    )
    whatsapp_send_max_attempts: int = Field(
        4, ge=1, le=10, description="attempts of a send that gets 429 or 5xx"
    )
    whatsapp_send_backoff_ms: int = Field(
        200, ge=0, description="first retry delay of a send; doubles each attempt"
    )
    outbound_concurrency: int = Field(
        16,
        ge=1,
        # The Graph API client's connection pool holds 100: more would wait for a connection.
        le=100,
        description="leads a worker sends to at once (a lead's messages still go out in order)",
    )
    window_closing_notice_min: int = Field(
        60, ge=1, le=1439, description="minutes before a 24-hour window closes to emit a notice"
    )
    timer_tick_ms: int = Field(250, ge=50, description="how often workers check due deadlines")
    webhook_dedup_cache_size: int = Field(
        100_000, ge=0, description="recent message ids each API process remembers"
    )

    # --- AI qualification (issue 4) ---
    openai_api_key: SecretStr | None = Field(
        None, description="OpenAI (or compatible) key; unset: the built-in extractor answers"
    )
    openai_base_url: str | None = Field(
        None, description="OpenAI-compatible base URL (vLLM, Ollama, a test server)"
    )
    openai_model: str = Field("gpt-4o-mini", description="model of extraction and questions")
    openai_timeout_s: float = Field(10.0, gt=0, description="timeout of one model call")
    openai_max_retries: int = Field(2, ge=0, description="client retries on 429/5xx")
    ai_breaker_failures: int = Field(
        3, ge=1, description="consecutive model failures that open the circuit breaker"
    )
    ai_breaker_cooldown_s: float = Field(
        60.0, gt=0, description="how long the built-in extractor answers after the breaker opens"
    )
    qualification_budget_threshold: float = Field(
        5000, gt=0, description="budget at which a lead counts as high value"
    )
    qualification_budget_currency: str = Field("USD", description="currency of the threshold")
    qualification_escalation_days: int = Field(
        30, ge=0, description="a high-value lead with a timeline within this many days escalates"
    )

    # --- Leakage prevention (issue 5) ---
    leak_threshold_s: int = Field(
        1800,
        ge=1,
        description="an unanswered customer message becomes a leak after this long "
        "(tenants.leak_threshold_s overrides it per tenant)",
    )

    tenant_settings_ttl_s: float = Field(
        60.0,
        ge=0,
        description="how long a worker keeps a tenant's settings (leak threshold, time zone, "
        "qualification budget, connected mailbox) before reading them again: a change "
        "reaches the workers within this long; 0 reads them for every message",
    )

    inbound_stale_after_s: int = Field(
        86_400, ge=0, description="a customer message read this long after it was written (a "
        "mailbox's history imported on connect, a channel's retries after a long outage) is "
        "recorded but not acted on: no AI interview step, no leak wait, no recovery silence; "
        "0: every message is acted on",
    )  # fmt: skip
    recovery_silence_s: int = Field(
        86_400, ge=1, description="a COLD lead silent this long enters cold recovery"
    )
    recovery_delays_s: str = Field(
        "0,172800,345600,604800",
        pattern=r"^\d+(,\d+){3}$",
        description="seconds after recovery starts of its four steps (re-engagement, curiosity, "
        "educational, soft call to action); default 0, 2, 4 and 7 days",
    )
    recovery_local_hour: int | None = Field(
        10,
        ge=0,
        le=23,
        description="recovery messages wait for this hour, tenant local time "
        "(none: send as soon as due)",
    )

    # --- Gmail (issue 7) ---
    gmail_client_id: str | None = Field(
        None, description="Google OAuth client id (unset: the Gmail endpoints answer 503)"
    )
    gmail_client_secret: SecretStr | None = Field(None, description="Google OAuth client secret")
    gmail_redirect_uri: str = Field(
        "http://127.0.0.1:8000/api/integrations/gmail/callback",
        description="OAuth redirect URI registered with Google (the API's callback)",
    )
    gmail_auth_url: str = Field(
        "https://accounts.google.com/o/oauth2/v2/auth", description="Google's consent page"
    )
    gmail_token_url: str = Field(
        "https://oauth2.googleapis.com/token", description="Google's OAuth token endpoint"
    )
    gmail_api_url: str = Field(
        "https://gmail.googleapis.com/", description="Gmail API base URL (tests use a local server)"
    )
    gmail_poll_interval_s: float = Field(
        60.0, ge=1, description="how often each connected mailbox is polled (history.list)"
    )
    gmail_resync_days: int = Field(
        7, ge=1, le=90, description="a full resync (history too old) reads this many days back"
    )
    gmail_state_ttl_s: int = Field(
        600, ge=30, description="how long a consent URL's state is accepted by the callback"
    )
    gmail_lease_s: int = Field(
        120, ge=10, description="a poller holds a mailbox this long at most (a crashed poller's "
        "mailboxes are taken over after it)",
    )  # fmt: skip
    gmail_poll_concurrency: int = Field(
        8, ge=1, le=256, description="mailboxes one poller polls at the same time"
    )

    # --- Tokens and Razorpay (issue 6) ---
    token_packs: str = Field(
        "starter=100@50,growth=500@200,pro=1000@350,enterprise=5000@1500",
        pattern=r"^[a-z0-9_-]+=\d+@\d+(\.\d{1,2})?(,[a-z0-9_-]+=\d+@\d+(\.\d{1,2})?)*$",
        description="token packs on sale: name=tokens@price (price in PAYMENT_CURRENCY units)",
    )
    payment_currency: str = Field(
        "USD", pattern=r"^[A-Z]{3}$", description="currency of pack prices and Razorpay orders"
    )
    token_prices: str = Field(
        "qualification=1,reengagement=1,recovery=1",
        pattern=r"^[a-z_]+=\d+(,[a-z_]+=\d+)*$",
        description="platform tokens charged per AI action, by feature",
    )
    token_model_tokens_per_token: int = Field(
        0,
        ge=0,
        description="model tokens (prompt + completion) per extra platform token charged on top "
        "of the action's price (0: flat price per action)",
    )
    token_trial_grant: int = Field(
        100, ge=0, description="tokens credited to a new tenant (its first cycle)"
    )
    razorpay_key_id: str | None = Field(
        None, description="Razorpay API key id (unset: top-up endpoints answer 503)"
    )
    razorpay_key_secret: SecretStr | None = Field(None, description="Razorpay API key secret")
    razorpay_webhook_secret: SecretStr | None = Field(
        None, description="secret of the Razorpay webhook (not the API key secret)"
    )
    razorpay_timeout_s: float = Field(
        10.0,
        gt=0,
        le=30,
        # At most 30: a capture's claim on its order stands 120 s (flexoraa.credits).
        description="longest wait for each Razorpay API call (its connect, then its answer)",
    )
    razorpay_capture_sweep_s: float = Field(
        60.0,
        ge=0,
        description="how often the API captures and credits authorised payments no checkout"
        " verified (a customer who closed the checkout, a late authorisation); 0: never",
    )
    razorpay_capture_after_s: float = Field(
        600.0,
        ge=0,
        # Razorpay refunds an authorisation not captured within 3 days (its default): the
        # sweep must come well before that, and after the checkout's own verify.
        le=86_400,
        description="how old a payment.authorized webhook is before the sweep captures its"
        " payment (the checkout's verify goes first)",
    )
    razorpay_api_url: str = Field(
        "https://api.razorpay.com", description="Razorpay API base URL (tests use a local server)"
    )
    outbox_poll_interval_ms: int = Field(
        200, ge=10, description="how often a worker publishes pending credit outbox rows"
    )
    token_batch_max: int = Field(
        2000, ge=1, description="token events the account fold and ledger sinks take per slice"
    )

    # --- SLA monitoring (issue 8) ---
    sla_target_ai_message_p90_ms: float = Field(
        1000, gt=0, description="SLA target: P90 of an AI model call stays below this"
    )
    sla_target_verification_p90_ms: float = Field(
        500, gt=0, description="SLA target: P90 of a webhook signature or payment check"
    )
    sla_target_routing_p90_ms: float = Field(
        5000, gt=0, description="SLA target: P90 from first inbound message to SDR assigned"
    )
    sla_target_error_rate: float = Field(
        0.001, ge=0, le=1, description="SLA target: error rate of every operation (0.001 = 0.1 %)"
    )
    sla_target_uptime: float = Field(
        0.999, ge=0, le=1, description="SLA target: uptime of API, workers, Kafka, PostgreSQL"
    )
    sla_violation_window_min: int = Field(
        5, ge=1, le=60, description="minutes of the rolling window a target is judged over"
    )
    sla_min_calls: int = Field(
        20, ge=1, description="calls a window needs before its P90 or error rate is judged"
    )
    sla_lateness_allowance_s: int = Field(
        120, ge=0, le=3600, description="how late (event time) a latency event is still counted"
    )
    sla_evaluate_interval_s: float = Field(
        10.0, ge=0.2, description="how often workers store minute aggregates and judge targets"
    )
    sla_gauge_refresh_s: float = Field(
        5.0, ge=0.0, description="how often the API re-reads its SLA gauges from sla_metrics "
        "(at most once per interval, on a /metrics scrape)",
    )  # fmt: skip
    sla_probe_interval_s: float = Field(
        5.0, ge=0.2, description="how often the leader worker probes API, workers, Kafka, PG"
    )
    sla_probe_api_url: str = Field(
        "http://127.0.0.1:8000", description="base URL of the API the uptime prober checks"
    )
    sla_alert_tenant_id: str | None = Field(
        None, description="tenant whose admins are alerted of platform-wide violations (none: "
        "Prometheus alerts only)",
    )  # fmt: skip
    latency_buffer_max: int = Field(
        10_000, ge=1, description="latency events a process buffers for Kafka before dropping"
    )
    latency_flush_interval_ms: int = Field(
        200, ge=10, description="how often buffered latency events are produced"
    )

    @model_validator(mode="after")
    def _refuse_dev_defaults_in_production(self) -> Settings:
        if self.environment == "production" and "127.0.0.1" in self.kafka_bootstrap_servers:
            raise ValueError("KAFKA_BOOTSTRAP_SERVERS must be set explicitly in production")
        return self

    @field_validator("api_rate_limit", "webhook_rate_limit", "auth_failure_rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '100/second;3000/minute': {exc}") from exc
        return value

    @field_validator("whatsapp_template_parameters")
    @classmethod
    def _known_template_fields(cls, value: str) -> str:
        # Checked at start: a typo raised at the first send outside the window, and every such
        # command was dead-lettered.
        template_fields(value)
        return value

    @field_validator("token_prices")
    @classmethod
    def _known_features_priced_once(cls, value: str) -> str:
        # A misspelt feature (`qualifcation=1`) left the real one at its default unnoticed.
        named = [part.split("=", 1)[0] for part in value.split(",")]
        features = sorted(get_args(Feature))
        unknown = sorted(set(named) - set(features))
        if unknown or len(set(named)) != len(named):
            raise ValueError(f"price features of {features}, each at most once; got {named}")
        return value

    @property
    def gmail_configured(self) -> bool:
        """Whether the Google OAuth client is set: without it no mailbox can be connected
        or polled."""
        return bool(self.gmail_client_id and self.gmail_client_secret)

    @property
    def worker_advertised_url(self) -> str:
        if self.worker_canonical_url:
            return self.worker_canonical_url
        host = self.worker_web_host
        if host in _EVERY_INTERFACE:
            # Bound to every interface (a container's worker): the others reach it at this
            # machine's address. Advertised as 0.0.0.0, a read routed to it went nowhere, and
            # one fixed name for all (a compose service scaled out) sent them all to one.
            host = _own_address()
        return f"http://{host}:{self.worker_web_port}"

    @cached_property
    def kafka_port(self) -> int:
        """Port of the first bootstrap server (the stack's broker listens there)."""
        first = self.kafka_bootstrap_servers.split(",")[0]
        return int(first.rsplit(":", 1)[1])


def unused_standby_copies(settings: Settings) -> str | None:
    """Why the configured standby copies cannot serve a takeover, or None if they can.

    Faust's memory store keeps no changelog offsets and drops every partition but the active
    ones when a recovery completes, so a partition taken over is replayed from offset 0 whatever
    the copy holds (seen with two workers and 100,000 leads: every changelog partition of the
    survivor read from -1). The copies then only cost their worker the changelog traffic."""
    if settings.worker_standby_replicas and settings.table_store.lower().startswith("memory:"):
        return (
            f"WORKER_STANDBY_REPLICAS={settings.worker_standby_replicas} with TABLE_STORE="
            f"{settings.table_store}: a memory store replays a partition it takes over from its "
            "changelog's start, so the copies cost changelog traffic and save nothing"
        )
    return None


# Hosts meaning "bind every interface": never an address another machine can reach.
_EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})


def _own_address() -> str:
    """This machine's address as its name resolves (a container's /etc/hosts maps its name
    to its address on the network), or the name itself where it resolves to a loopback
    address (Debian maps its own name to 127.0.1.1) or not at all."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return name
    return name if address.startswith("127.") else address
