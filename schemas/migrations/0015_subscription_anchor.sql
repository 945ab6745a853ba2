-- The day a subscription's cycles are counted from: each cycle ends on the anchor's day of the
-- month (clamped to shorter months), not a month after the previous, clamped, end (a plan
-- started on Jan 31 ran Feb 28, Mar 28, … for good, its cycles three days short).
ALTER TABLE subscriptions ADD COLUMN billing_anchor timestamptz;
-- The first cycle credited: a subscription whose cycles drifted already goes back to its day.
UPDATE subscriptions s SET billing_anchor = coalesce(
    (SELECT min(period_start) FROM subscription_credits c
     WHERE c.subscription_id = s.subscription_id),
    s.current_period_start);
ALTER TABLE subscriptions ALTER COLUMN billing_anchor SET NOT NULL;
