-- Tenants, their API keys, leads and their messages.

CREATE TABLE tenants (
    tenant_id   uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'disabled')),
    time_zone   text NOT NULL DEFAULT 'UTC',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    key_id      uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (tenant_id),
    -- SHA-256 of the key: keys are long random strings, so a fast hash is enough and lets the
    -- lookup be an index probe.
    key_hash    bytea NOT NULL UNIQUE,
    key_prefix  text NOT NULL,
    role        text NOT NULL DEFAULT 'admin' CHECK (role IN ('admin', 'sdr', 'connector')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE leads (
    lead_id           uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants (tenant_id),
    channel           text NOT NULL,
    contact           text NOT NULL,
    contact_name      text,
    first_seen_at     timestamptz NOT NULL,
    last_activity_at  timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, channel, contact)
);
-- The lead list: newest activity first, keyset-paginated.
CREATE INDEX leads_tenant_activity ON leads (tenant_id, last_activity_at DESC, lead_id DESC);

CREATE TABLE messages (
    event_id            uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL REFERENCES tenants (tenant_id),
    lead_id             uuid NOT NULL REFERENCES leads (lead_id),
    direction           text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    channel             text NOT NULL,
    message_type        text NOT NULL DEFAULT 'text',
    body                text NOT NULL,
    channel_message_id  text,
    occurred_at         timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, channel, direction, channel_message_id)
);
CREATE INDEX messages_lead_time ON messages (lead_id, occurred_at, event_id);
