-- Meta channels (WhatsApp numbers, Instagram accounts, Facebook pages), outbound sends and
-- delivery statuses, and the lead events history.

CREATE TABLE channels (
    channel_id              uuid PRIMARY KEY,
    tenant_id               uuid NOT NULL REFERENCES tenants (tenant_id),
    kind                    text NOT NULL CHECK (kind IN ('whatsapp', 'instagram', 'facebook')),
    -- WhatsApp: the phone_number_id; Instagram/Facebook: the account or page id (entry[].id).
    external_id             text NOT NULL,
    waba_id                 text,
    display_phone_number    text,
    -- AES-GCM ciphertexts bound to channel_id; never returned by the API.
    encrypted_app_secret    bytea NOT NULL,
    encrypted_access_token  bytea NOT NULL,
    -- The handshake compares a token Meta sends, so a hash is enough and nothing decrypts.
    verify_token_hash       bytea NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, external_id)
);
CREATE INDEX channels_tenant ON channels (tenant_id);
CREATE INDEX channels_verify_token ON channels (verify_token_hash);

ALTER TABLE messages
    ADD COLUMN command_id     uuid,
    ADD COLUMN send_kind      text CHECK (send_kind IN ('freeform', 'template')),
    ADD COLUMN sent_by        text,
    ADD COLUMN send_status    text,
    ADD COLUMN error_code     text,
    ADD COLUMN error_message  text;
CREATE INDEX messages_outbound_tenant_time ON messages (tenant_id, occurred_at)
    WHERE direction = 'outbound';

-- The latest delivery status per channel message, applied in timestamp order (a status may
-- arrive before the send is recorded, so it lives beside messages, not in them).
CREATE TABLE message_statuses (
    tenant_id           uuid NOT NULL,
    channel             text NOT NULL,
    channel_message_id  text NOT NULL,
    status              text NOT NULL CHECK (status IN ('sent', 'delivered', 'read', 'failed')),
    status_at           timestamptz NOT NULL,
    error_code          text,
    error_title         text,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, channel, channel_message_id)
);

CREATE TABLE lead_events (
    event_id     uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    lead_id      uuid NOT NULL,
    type         text NOT NULL,
    data         jsonb NOT NULL DEFAULT '{}',
    occurred_at  timestamptz NOT NULL
);
CREATE INDEX lead_events_lead_time ON lead_events (lead_id, occurred_at);
CREATE INDEX lead_events_tenant_type_time ON lead_events (tenant_id, type, occurred_at);

-- Sends and statuses may be written before the sink has written their lead (each topic has its
-- own sink), so messages no longer require the lead row to exist first.
ALTER TABLE messages DROP CONSTRAINT messages_lead_id_fkey;
