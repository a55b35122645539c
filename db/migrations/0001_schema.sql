-- drop-worker schema. Table and column names are a contract with the web tier (DESIGN.md):
-- columns added later must be nullable or have a default; ids are the web tier's text ids.

CREATE TABLE users (
    id                text PRIMARY KEY,
    national_id_hash  text CHECK (national_id_hash IS NULL OR national_id_hash ~ '^[0-9a-f]{64}$'),
    first_name        text,
    last_name         text,
    kyc_status        text NOT NULL DEFAULT 'not_started'
                      CHECK (kyc_status IN ('not_started', 'pending', 'approved', 'rejected')),
    kyc_applicant_id  text UNIQUE,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE screening_results (
    id                bigserial PRIMARY KEY,
    user_id           text NOT NULL REFERENCES users (id),
    screening_type    text NOT NULL CHECK (screening_type IN ('kyc', 'aml')),
    result            text NOT NULL,
    provider          text NOT NULL DEFAULT 'sumsub',
    provider_ref      text,            -- Sumsub applicant id
    provider_event_id text,            -- the delivery's event id, when there is one
    review_answer     text,
    reject_type       text,
    reject_labels     jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX screening_results_user_idx ON screening_results (user_id, screening_type, created_at);

-- Dedup of deliveries: a consumer group records an event once, in the transaction of its effects.
CREATE TABLE processed_events (
    event_id        text NOT NULL,
    consumer_group  text NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, consumer_group)
);
CREATE INDEX processed_events_age_idx ON processed_events (processed_at);

-- No PII in details: ids, statuses, codes and counts only.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    user_id     text,
    action      text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_user_idx ON audit_log (user_id, created_at);
CREATE INDEX audit_log_action_idx ON audit_log (action, created_at);

CREATE TABLE notifications (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL REFERENCES users (id),
    kind        text NOT NULL,
    message     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_user_idx ON notifications (user_id, created_at);

CREATE TABLE bank_accounts (
    id                   text PRIMARY KEY,
    user_id              text NOT NULL REFERENCES users (id),
    provider_account_id  text NOT NULL,
    consent_id           text,
    consent_status       text NOT NULL DEFAULT 'valid'
                         CHECK (consent_status IN ('valid', 'expired', 'revoked')),
    consent_expires_at   timestamptz,
    balance              bigint,                       -- øre; NULL until the first sync
    currency             text NOT NULL DEFAULT 'NOK' CHECK (currency ~ '^[A-Z]{3}$'),
    balance_synced_at    timestamptz,
    needs_relink         boolean NOT NULL DEFAULT false,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bank_accounts_user_idx ON bank_accounts (user_id);

-- The PSD2 quota ledger: one row per balance request sent to the provider.
CREATE TABLE aisp_reads (
    id               bigserial PRIMARY KEY,
    bank_account_id  text NOT NULL REFERENCES bank_accounts (id),
    initiated_by     text NOT NULL CHECK (initiated_by IN ('scheduler', 'user')),
    requested_at     timestamptz NOT NULL DEFAULT now(),
    request_id       text,
    outcome          text,             -- filled in after the answer (ok, consent_expired, …)
    http_status      integer
);
CREATE INDEX aisp_reads_quota_idx ON aisp_reads (bank_account_id, requested_at)
    WHERE initiated_by = 'scheduler';

CREATE TABLE transactions (
    id               text PRIMARY KEY,
    user_id          text NOT NULL REFERENCES users (id),
    bank_account_id  text REFERENCES bank_accounts (id),
    idempotency_key  text NOT NULL UNIQUE,
    amount           bigint NOT NULL CHECK (amount > 0),  -- øre
    currency         text NOT NULL DEFAULT 'NOK' CHECK (currency ~ '^[A-Z]{3}$'),
    payment_id       text UNIQUE,
    status           text NOT NULL DEFAULT 'processing'
                     CHECK (status IN ('processing', 'completed', 'failed')),
    provider_status  text,
    failure_reason   text,
    last_polled_at   timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transactions_processing_idx ON transactions (created_at) WHERE status = 'processing';

-- The cross-language enqueue contract: INSERT (job, payload, idempotency_key) in your own
-- transaction; every other column has a default.
CREATE TABLE job_outbox (
    id               bigserial PRIMARY KEY,
    job              text NOT NULL CHECK (length(job) BETWEEN 1 AND 200),
    payload          jsonb NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key  text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 500),
    created_at       timestamptz NOT NULL DEFAULT now(),
    available_at     timestamptz NOT NULL DEFAULT now(),
    relayed_at       timestamptz,
    relay_count      integer NOT NULL DEFAULT 0,
    done_at          timestamptz,
    error            text
);
CREATE INDEX job_outbox_pending_idx ON job_outbox (available_at, id)
    WHERE done_at IS NULL AND error IS NULL;

-- Wake the relay on every insert, so callers need not send NOTIFY themselves.
CREATE FUNCTION job_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('job_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER job_outbox_notify AFTER INSERT ON job_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION job_outbox_notify();

-- Dead letters live in PostgreSQL (the source of truth), not only in Redis' XQ: losing Redis
-- must not lose the record of what failed and why. `drop-jobs dlq` reads this table.
CREATE TABLE dead_letters (
    id            bigserial PRIMARY KEY,
    message_id    text NOT NULL UNIQUE,
    job           text NOT NULL,
    queue_name    text NOT NULL,
    message       jsonb NOT NULL,      -- the Dramatiq message (args/kwargs/options) to replay
    outbox_id     bigint,
    reason        text NOT NULL,
    retries       integer NOT NULL DEFAULT 0,
    failed_at     timestamptz NOT NULL DEFAULT now(),
    replayed_at   timestamptz
);
CREATE INDEX dead_letters_open_idx ON dead_letters (failed_at) WHERE replayed_at IS NULL;

-- Scheduler history: one row per (job, slot). The primary key makes a slot fire at most once
-- whatever the number of scheduler replicas; `missed` records a slot skipped after an outage.
CREATE TABLE scheduler_fires (
    job        text NOT NULL,
    slot       timestamptz NOT NULL,
    status     text NOT NULL DEFAULT 'fired' CHECK (status IN ('fired', 'missed')),
    leader     text NOT NULL,
    fired_at   timestamptz NOT NULL DEFAULT now(),
    outbox_id  bigint,
    PRIMARY KEY (job, slot)
);
CREATE INDEX scheduler_fires_recent_idx ON scheduler_fires (job, fired_at DESC);
