-- An append-only audit log: who did what to a tenant's account, integrations and money.

CREATE TABLE audit_log (
    audit_id     bigserial PRIMARY KEY,
    tenant_id    uuid REFERENCES tenants (tenant_id),
    actor        text NOT NULL,   -- "key:<key id>", "cli", "system", "razorpay", "google"
    action       text NOT NULL,   -- e.g. api_key.created, payment.credited, tenant.paused
    target       text,
    details      jsonb NOT NULL DEFAULT '{}',
    -- Entries derived from the stream carry their event's key, so a replay adds nothing.
    event_key    text UNIQUE,
    occurred_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant_time ON audit_log (tenant_id, occurred_at DESC);

-- Append-only for every role, the application's included (a trigger binds the table owner
-- too, which REVOKE alone would not).
CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC;
