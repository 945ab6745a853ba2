-- The people notified for a tenant: admins get threshold, SLA and escalation alerts.

CREATE TABLE tenant_admins (
    tenant_id   uuid NOT NULL REFERENCES tenants (tenant_id),
    email       text NOT NULL CHECK (position('@' IN email) > 1),
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, email)
);
