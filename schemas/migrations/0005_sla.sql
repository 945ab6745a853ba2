-- SLA monitoring: uptime probes per minute, and the indexes the monitoring endpoints read by.

-- One row per probed component, minute and prober process. Only the leader worker probes, but
-- leadership can move within a minute; each prober writes its own counts (an idempotent upsert
-- of absolute values), and readers sum over probers.
CREATE TABLE sla_uptime (
    component    text NOT NULL CHECK (component IN ('api', 'workers', 'kafka', 'postgres',
                                                    'platform')),
    minute       timestamptz NOT NULL,
    prober_id    uuid NOT NULL,
    probes       integer NOT NULL CHECK (probes >= 0),
    up           integer NOT NULL CHECK (up >= 0 AND up <= probes),
    interval_s   double precision NOT NULL CHECK (interval_s > 0),
    PRIMARY KEY (component, minute, prober_id)
);
CREATE INDEX sla_uptime_minute ON sla_uptime (minute);

-- The dashboard and current views read one tenant's minutes across operations.
CREATE INDEX sla_metrics_tenant_minute ON sla_metrics (tenant_key, minute);
CREATE INDEX sla_violations_tenant_started ON sla_violations (tenant_key, started_at);
