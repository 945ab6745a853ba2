-- The day a subscription's cycles are counted from: each cycle ends on the anchor's day of the
-- month (clamped to shorter months), not a month after the previous, clamped, end (a plan
-- started on Jan 31 ran Feb 28, Mar 28, … for good, its cycles three days short).
ALTER TABLE subscriptions ADD COLUMN billing_anchor timestamptz;
UPDATE subscriptions SET billing_anchor = current_period_start;
ALTER TABLE subscriptions ALTER COLUMN billing_anchor SET NOT NULL;
