-- Payments saga (issue 5): polling schedule in PostgreSQL, SCA timeout watch, and a ledger that
-- makes "the cached balance is restored at most once" a database fact. Every new column is
-- nullable or has a default (contract with the web tier, DESIGN.md).

ALTER TABLE transactions
    -- When the next status poll is due. Defaults to the insert time, so a payment the web tier
    -- creates is picked up by `pisp.sweep` even if no poll was enqueued. NULL: nothing to poll
    -- (final and not watched).
    ADD COLUMN next_poll_at  timestamptz DEFAULT now(),
    ADD COLUMN poll_step     integer NOT NULL DEFAULT 0 CHECK (poll_step >= 0),   -- backoff position
    ADD COLUMN poll_count    integer NOT NULL DEFAULT 0 CHECK (poll_count >= 0),  -- provider status reads
    -- Set when the SCA expiry failed the payment; the 24 h late-completion watch runs from here.
    ADD COLUMN timed_out_at  timestamptz,
    -- Set when a payment failed by SCA timeout was later reported accepted by the bank.
    ADD COLUMN completed_late_at timestamptz;

-- Rows that existed before this migration: only processing ones have anything to poll.
UPDATE transactions SET next_poll_at = NULL WHERE status <> 'processing';

CREATE INDEX transactions_next_poll_idx ON transactions (next_poll_at) WHERE next_poll_at IS NOT NULL;

-- Compensations applied to a cached balance. The primary key makes each kind happen at most
-- once per payment: 'restore' (+amount, payment failed) and 'redebit' (-amount, a payment failed
-- by SCA timeout that the bank completed after all). Written in the transaction that changes
-- bank_accounts.balance.
CREATE TABLE payment_balance_adjustments (
    transaction_id   text NOT NULL REFERENCES transactions (id),
    kind             text NOT NULL CHECK (kind IN ('restore', 'redebit')),
    bank_account_id  text NOT NULL REFERENCES bank_accounts (id),
    amount           bigint NOT NULL CHECK (amount > 0),  -- øre, always positive; kind gives the sign
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- A re-debit only ever undoes a restore: it must reference the restore row of its payment.
    undoes           text GENERATED ALWAYS AS (CASE WHEN kind = 'redebit' THEN 'restore' END) STORED,
    PRIMARY KEY (transaction_id, kind),
    FOREIGN KEY (transaction_id, undoes) REFERENCES payment_balance_adjustments (transaction_id, kind)
);
