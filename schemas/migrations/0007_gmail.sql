-- Gmail (issue 7): one-time OAuth states, poll scheduling and the threads replies go into.

-- A consent URL's `state`: bound to the tenant, expires, and works once.
CREATE TABLE oauth_states (
    state       text PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (tenant_id),
    provider    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

ALTER TABLE gmail_poll_state
    ADD COLUMN next_poll_at   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error_at  timestamptz;
CREATE INDEX gmail_poll_state_due ON gmail_poll_state (next_poll_at);

-- The Gmail thread of each e-mail lead, so replies go into it (threadId, In-Reply-To,
-- References).
CREATE TABLE email_threads (
    lead_id             uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL REFERENCES tenants (tenant_id),
    integration_id      uuid NOT NULL REFERENCES integration_credentials (integration_id),
    thread_id           text NOT NULL,
    last_message_id     text,
    references_header   text,
    subject             text,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
