-- The tables of the seed's migration (029_missing_tables.sql); later work refines their columns.

CREATE TABLE lead_qualification_state (
    event_id         uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (tenant_id),
    lead_id          uuid NOT NULL REFERENCES leads (lead_id),
    turn             smallint NOT NULL CHECK (turn BETWEEN 1 AND 6),
    status           text NOT NULL,
    facts            jsonb NOT NULL DEFAULT '{}',
    score            numeric(6, 2) NOT NULL DEFAULT 0,
    assigned_sdr_id  uuid,
    source           text NOT NULL DEFAULT 'builtin',
    occurred_at      timestamptz NOT NULL
);
CREATE INDEX lead_qualification_state_lead ON lead_qualification_state (lead_id, occurred_at);

CREATE TABLE lead_leakage_events (
    event_id       uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (tenant_id),
    lead_id        uuid NOT NULL REFERENCES leads (lead_id),
    temperature    text NOT NULL CHECK (temperature IN ('HOT', 'WARM', 'COLD')),
    action         text NOT NULL,
    waiting_since  timestamptz NOT NULL,
    deadline_at    timestamptz NOT NULL,
    detected_at    timestamptz NOT NULL,
    details        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX lead_leakage_events_tenant_time ON lead_leakage_events (tenant_id, detected_at);

CREATE TABLE lead_reassignment_log (
    event_id     uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (tenant_id),
    lead_id      uuid NOT NULL REFERENCES leads (lead_id),
    from_sdr_id  uuid,
    to_sdr_id    uuid,
    reason       text NOT NULL,
    occurred_at  timestamptz NOT NULL
);
CREATE INDEX lead_reassignment_log_tenant_time ON lead_reassignment_log (tenant_id, occurred_at);

CREATE TABLE lead_recovery_log (
    event_id      uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (tenant_id),
    lead_id       uuid NOT NULL REFERENCES leads (lead_id),
    step          smallint NOT NULL,
    strategy      text NOT NULL,
    status        text NOT NULL,
    tokens_spent  integer NOT NULL DEFAULT 0,
    sent_at       timestamptz,
    replied_at    timestamptz,
    occurred_at   timestamptz NOT NULL
);
CREATE INDEX lead_recovery_log_tenant_time ON lead_recovery_log (tenant_id, occurred_at);

CREATE TABLE payment_orders (
    order_id     text PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (tenant_id),
    receipt      text NOT NULL UNIQUE,
    pack         text NOT NULL,
    tokens       integer NOT NULL CHECK (tokens > 0),
    amount       bigint NOT NULL CHECK (amount > 0),
    currency     text NOT NULL,
    status       text NOT NULL DEFAULT 'created',
    payment_id   text UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_orders_tenant ON payment_orders (tenant_id, created_at);

CREATE TABLE integration_credentials (
    integration_id    uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants (tenant_id),
    provider          text NOT NULL,
    account           text NOT NULL,
    -- AES-GCM ciphertext (nonce || ciphertext || tag); never stored or returned in clear.
    encrypted_secret  bytea NOT NULL,
    status            text NOT NULL DEFAULT 'connected',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, provider, account)
);

CREATE TABLE gmail_poll_state (
    integration_id    uuid PRIMARY KEY REFERENCES integration_credentials (integration_id),
    tenant_id         uuid NOT NULL REFERENCES tenants (tenant_id),
    email             text NOT NULL,
    history_id        bigint,
    last_polled_at    timestamptz,
    last_success_at   timestamptz,
    last_error        text,
    lease_owner       text,
    lease_expires_at  timestamptz
);

CREATE TABLE sla_metrics (
    operation    text NOT NULL,
    -- '' is the all-tenants aggregate, so the primary key needs no NULL.
    tenant_key   text NOT NULL,
    minute       timestamptz NOT NULL,
    calls        integer NOT NULL,
    errors       integer NOT NULL,
    p50_ms       double precision,
    p90_ms       double precision,
    p99_ms       double precision,
    sketch       bytea,
    PRIMARY KEY (operation, tenant_key, minute)
);

CREATE TABLE sla_violations (
    violation_id  uuid PRIMARY KEY,
    tenant_key    text NOT NULL,
    operation     text NOT NULL,
    metric        text NOT NULL,
    target        double precision NOT NULL,
    worst_value   double precision NOT NULL,
    started_at    timestamptz NOT NULL,
    ended_at      timestamptz
);
CREATE INDEX sla_violations_open ON sla_violations (operation, tenant_key) WHERE ended_at IS NULL;

CREATE TABLE sla_daily_reports (
    day         date NOT NULL,
    tenant_key  text NOT NULL,
    report      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, tenant_key)
);

CREATE TABLE notifications (
    notification_id  uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (tenant_id),
    recipient        text NOT NULL,
    kind             text NOT NULL,
    title            text NOT NULL,
    body             text NOT NULL,
    data             jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    read_at          timestamptz
);
CREATE INDEX notifications_tenant_time ON notifications (tenant_id, created_at DESC);

CREATE TABLE subscriptions (
    subscription_id       uuid PRIMARY KEY,
    tenant_id             uuid NOT NULL REFERENCES tenants (tenant_id),
    plan                  text NOT NULL,
    monthly_tokens        integer NOT NULL CHECK (monthly_tokens >= 0),
    status                text NOT NULL DEFAULT 'active',
    current_period_start  timestamptz NOT NULL,
    current_period_end    timestamptz NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_tenant ON subscriptions (tenant_id);
