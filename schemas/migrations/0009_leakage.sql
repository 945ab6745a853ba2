-- Per-tenant leak threshold (NULL: LEAK_THRESHOLD_S).
ALTER TABLE tenants ADD COLUMN leak_threshold_s integer CHECK (leak_threshold_s > 0);

-- Each topic has its own sink, so a lead's history rows may be written before the lead row
-- (as for messages in 0006): the lead foreign keys would turn that race into lost rows.
ALTER TABLE lead_qualification_state DROP CONSTRAINT lead_qualification_state_lead_id_fkey;
ALTER TABLE lead_leakage_events DROP CONSTRAINT lead_leakage_events_lead_id_fkey;
ALTER TABLE lead_reassignment_log DROP CONSTRAINT lead_reassignment_log_lead_id_fkey;
ALTER TABLE lead_recovery_log DROP CONSTRAINT lead_recovery_log_lead_id_fkey;
