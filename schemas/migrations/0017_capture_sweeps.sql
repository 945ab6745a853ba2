-- Authorised payments the capture sweep (api.payments) has judged: a settled one (credited,
-- or nothing to credit) is never asked about again; another (Razorpay unreachable, another
-- payment's capture under way, a refused request) is asked again from next_attempt_at. A
-- payment being judged is leased the same way (outcome 'sweeping', next_attempt_at the lease's
-- end), so API processes sweeping at once judge it once.
CREATE TABLE payment_capture_sweeps (
    payment_id      text PRIMARY KEY,
    order_id        text NOT NULL REFERENCES payment_orders (order_id),
    attempts        integer NOT NULL CHECK (attempts >= 0),
    outcome         text NOT NULL,
    reason          text NOT NULL DEFAULT '',
    settled         boolean NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The sweep reads the authorisations of the last days out of every webhook delivery kept.
CREATE INDEX payment_events_authorized ON payment_events (received_at)
    WHERE event_type = 'payment.authorized';
