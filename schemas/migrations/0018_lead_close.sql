-- An SDR closes a lead (won, lost, disqualified): its assignment stops counting against the
-- SDR's open_leads. Without it nothing ever released a slot, and once every SDR had received
-- max_open_leads leads, every later lead went unassigned for good. A closed lead stays closed,
-- with its SDR.
ALTER TABLE sdr_assignments
    ADD COLUMN closed_at timestamptz,
    ADD COLUMN outcome text CHECK (outcome IN ('won', 'lost', 'disqualified')),
    ADD CONSTRAINT sdr_assignments_closed_with_outcome
        CHECK ((closed_at IS NULL) = (outcome IS NULL));
