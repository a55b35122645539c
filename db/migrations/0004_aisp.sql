-- AISP balance refresh (jobs/aisp.py). Additive only: new columns are nullable (web-tier contract).

-- 429 ACCESS_EXCEEDED: no unattended read of this account before this time (the current
-- refresh window, or Retry-After if longer). User-initiated reads ignore it.
ALTER TABLE bank_accounts ADD COLUMN aisp_paused_until timestamptz;

-- The Berlin Group error code of a failed read (codes only, never a response body).
ALTER TABLE aisp_reads ADD COLUMN error_code text;

-- The fan-out scans exactly these accounts, in id order (keyset chunks).
CREATE INDEX bank_accounts_aisp_active_idx ON bank_accounts (id)
    WHERE consent_status = 'valid' AND needs_relink = false AND consent_id IS NOT NULL;

CREATE INDEX aisp_reads_account_idx ON aisp_reads (bank_account_id, requested_at);

-- Reserve one read in the quota ledger, atomically, in one round trip.
--
-- The account row is locked first (FOR UPDATE) so reservations of one account are serialised;
-- each statement of a VOLATILE plpgsql function takes a fresh snapshot, so the count below sees
-- every reservation committed by whoever held the lock before us: two workers racing can never
-- make a fifth read. A refusal reserves nothing. User-initiated reads are recorded but never
-- counted or refused for quota (PSD2: the user is present).
CREATE FUNCTION aisp_reserve_read(
    p_account       text,
    p_initiated_by  text,
    p_now           timestamptz,
    p_request_id    text,
    p_limit         integer,
    p_window        interval
) RETURNS TABLE (
    read_id              bigint,
    refusal              text,      -- NULL when reserved; unknown_account|no_consent|paused|quota
    reads_in_window      integer,
    oldest_in_window     timestamptz,
    paused_until         timestamptz,
    user_id              text,
    provider_account_id  text,
    consent_id           text,
    currency             text
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    acct  bank_accounts%ROWTYPE;
    n     integer := 0;
    first timestamptz;
    rid   bigint;
BEGIN
    SELECT * INTO acct FROM bank_accounts b WHERE b.id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, 'unknown_account'::text, 0, NULL::timestamptz, NULL::timestamptz,
                            NULL::text, NULL::text, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF p_initiated_by = 'scheduler' THEN
        SELECT count(*), min(r.requested_at) INTO n, first
          FROM aisp_reads r
         WHERE r.bank_account_id = p_account AND r.initiated_by = 'scheduler'
           AND r.requested_at > p_now - p_window;
    END IF;
    IF acct.consent_status <> 'valid' OR acct.needs_relink OR acct.consent_id IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, 'no_consent'::text, n, first, acct.aisp_paused_until,
                            acct.user_id, acct.provider_account_id, acct.consent_id, acct.currency;
    ELSIF p_initiated_by = 'scheduler' AND acct.aisp_paused_until > p_now THEN
        RETURN QUERY SELECT NULL::bigint, 'paused'::text, n, first, acct.aisp_paused_until,
                            acct.user_id, acct.provider_account_id, acct.consent_id, acct.currency;
    ELSIF p_initiated_by = 'scheduler' AND n >= p_limit THEN
        RETURN QUERY SELECT NULL::bigint, 'quota'::text, n, first, acct.aisp_paused_until,
                            acct.user_id, acct.provider_account_id, acct.consent_id, acct.currency;
    ELSE
        INSERT INTO aisp_reads (bank_account_id, initiated_by, requested_at, request_id)
             VALUES (p_account, p_initiated_by, p_now, p_request_id)
          RETURNING id INTO rid;
        RETURN QUERY SELECT rid, NULL::text, n + CASE WHEN p_initiated_by = 'scheduler' THEN 1 ELSE 0 END,
                            COALESCE(first, p_now), acct.aisp_paused_until,
                            acct.user_id, acct.provider_account_id, acct.consent_id, acct.currency;
    END IF;
END $$;
