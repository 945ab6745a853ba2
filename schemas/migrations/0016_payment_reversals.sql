-- Money that went back to a customer (a refund, a lost dispute) takes its tokens back: one row
-- per Razorpay refund or dispute id, so each is debited once whichever of its webhooks comes
-- first or how often. `tokens` is what was debited; a refund that failed afterwards gives them
-- back (status 'failed'), and one that failed before any debit is kept so a late
-- refund.processed for it debits nothing. A reversal of a payment whose order is not credited
-- yet waits ('pending') for the credit, which takes it back in its own transaction.
CREATE TABLE payment_reversals (
    reversal_id  text PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('refund', 'chargeback')),
    order_id     text NOT NULL REFERENCES payment_orders (order_id),
    tenant_id    uuid NOT NULL REFERENCES tenants (tenant_id),
    payment_id   text NOT NULL,
    amount       bigint NOT NULL CHECK (amount >= 0),
    tokens       bigint NOT NULL CHECK (tokens >= 0),
    status       text NOT NULL CHECK (status IN ('pending', 'debited', 'failed')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_reversals_order ON payment_reversals (order_id);

ALTER TABLE token_ledger DROP CONSTRAINT token_ledger_kind_check;
ALTER TABLE token_ledger ADD CONSTRAINT token_ledger_kind_check
    CHECK (kind IN ('usage', 'credit', 'debit'));

-- The payment being captured for an order (verify): a second payment of the order is captured
-- only once Razorpay says this one was not, so a retried checkout is never charged twice, even
-- when a capture's answer was lost to a timeout.
ALTER TABLE payment_orders
    ADD COLUMN capturing_payment_id text,
    ADD COLUMN capture_claimed_at   timestamptz;
