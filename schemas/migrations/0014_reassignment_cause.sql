-- What moved a lead to its SDR, and from whom: a reassignment read again after a crash (the
-- same leak deadline firing twice) finds itself done and repeats the same move, instead of
-- moving the lead on to a third SDR.
ALTER TABLE sdr_assignments
    ADD COLUMN cause text,
    ADD COLUMN previous_sdr_id uuid REFERENCES sdrs (sdr_id) ON DELETE SET NULL;
CREATE INDEX sdr_assignments_previous ON sdr_assignments (previous_sdr_id);
