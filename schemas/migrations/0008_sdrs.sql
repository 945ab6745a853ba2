-- The SDR roster and lead assignments (round robin among active SDRs under their maximum).

CREATE TABLE sdrs (
    sdr_id            uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants (tenant_id),
    name              text NOT NULL,
    email             text NOT NULL CHECK (position('@' IN email) > 1),
    active            boolean NOT NULL DEFAULT true,
    max_open_leads    integer NOT NULL DEFAULT 50 CHECK (max_open_leads >= 0),
    open_leads        integer NOT NULL DEFAULT 0 CHECK (open_leads >= 0),
    last_assigned_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email)
);
CREATE INDEX sdrs_tenant_rotation ON sdrs (tenant_id, last_assigned_at NULLS FIRST)
    WHERE active;

CREATE TABLE sdr_assignments (
    lead_id      uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (tenant_id),
    sdr_id       uuid NOT NULL REFERENCES sdrs (sdr_id),
    reason       text NOT NULL,
    assigned_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sdr_assignments_sdr ON sdr_assignments (sdr_id);
