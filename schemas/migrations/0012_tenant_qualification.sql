-- Per-tenant qualification policy (NULL: the platform's setting).
ALTER TABLE tenants
    ADD COLUMN qualification_budget_threshold numeric CHECK (qualification_budget_threshold > 0),
    ADD COLUMN qualification_escalation_days integer CHECK (qualification_escalation_days >= 0);
