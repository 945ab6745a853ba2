-- Token economy (issue 6): payments, the credit outbox, the token ledger and daily usage.

ALTER TABLE payment_orders
    ADD COLUMN failure_reason text,
    ADD COLUMN credited_at    timestamptz;

-- Every Razorpay webhook delivery we accepted, by Razorpay's x-razorpay-event-id: a redelivery
-- is acknowledged and ignored.
CREATE TABLE payment_events (
    event_id     text PRIMARY KEY,
    event_type   text NOT NULL,
    order_id     text,
    payment_id   text,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

-- Transactional outbox: a credit commits together with the state change that caused it (an
-- order paid, a subscription cycle, a new tenant); the relay publishes it to the token-credits
-- topic and only then sets published_at. The event id is the credit's, so a relay that
-- publishes twice (crash between publish and mark) is absorbed by the account's dedup.
CREATE TABLE token_outbox (
    event_id      text PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (tenant_id),
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX token_outbox_pending ON token_outbox (created_at) WHERE published_at IS NULL;

-- Monthly included tokens: one row per credited cycle makes crediting idempotent.
CREATE TABLE subscription_credits (
    subscription_id  uuid NOT NULL REFERENCES subscriptions (subscription_id),
    period_start     timestamptz NOT NULL,
    tokens           integer NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, period_start)
);

-- The token ledger: every usage and credit event once (by event id), for audit and reports.
CREATE TABLE token_ledger (
    event_id           text PRIMARY KEY,
    tenant_id          uuid NOT NULL,
    kind               text NOT NULL CHECK (kind IN ('usage', 'credit')),
    feature            text,
    source             text,
    lead_id            text,
    model              text,
    prompt_tokens      bigint NOT NULL DEFAULT 0,
    completion_tokens  bigint NOT NULL DEFAULT 0,
    tokens             bigint NOT NULL,
    occurred_at        timestamptz NOT NULL
);
CREATE INDEX token_ledger_tenant_time ON token_ledger (tenant_id, occurred_at);

-- Usage per tenant, day (UTC) and feature, maintained with the ledger in one transaction.
CREATE TABLE token_usage_daily (
    tenant_id  uuid NOT NULL,
    day        date NOT NULL,
    feature    text NOT NULL,
    tokens     bigint NOT NULL,
    actions    bigint NOT NULL,
    PRIMARY KEY (tenant_id, day, feature)
);
