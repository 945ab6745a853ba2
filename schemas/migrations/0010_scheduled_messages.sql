-- Messages scheduled for later (`POST /api/leads/{id}/messages` with `send_at`).

CREATE TABLE scheduled_messages (
    scheduled_id  uuid PRIMARY KEY,  -- also the outbound command's event id
    tenant_id     uuid NOT NULL REFERENCES tenants (tenant_id),
    lead_id       uuid NOT NULL,
    body          text NOT NULL,
    send_at       timestamptz NOT NULL,
    status        text NOT NULL DEFAULT 'scheduled'
                  CHECK (status IN ('scheduled', 'sent', 'failed', 'cancelled')),
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX scheduled_messages_tenant ON scheduled_messages (tenant_id, send_at);
