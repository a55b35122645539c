-- KYC webhooks (jobs/kyc.py, docs/kyc.md). Contract: new columns are nullable.

-- Ordering guard: the creation time (and derived id) of the Sumsub review event that produced
-- the current kyc_status. A review event changes kyc_status only if it is strictly newer
-- (conditional UPDATE), so an older event delivered late never overwrites a newer decision.
ALTER TABLE users ADD COLUMN IF NOT EXISTS kyc_event_at timestamptz;
ALTER TABLE users ADD COLUMN IF NOT EXISTS kyc_event_id text;

-- One AML screening row per check: the check is keyed by the webhook event that asked for it
-- (provider_event_id), so a re-run of kyc.aml_check never adds a second row.
CREATE UNIQUE INDEX IF NOT EXISTS screening_results_aml_check_once
    ON screening_results (provider_event_id) WHERE screening_type = 'aml';

-- Lookups by Sumsub applicant id for screening history.
CREATE INDEX IF NOT EXISTS screening_results_provider_ref_idx
    ON screening_results (provider_ref, screening_type);
