-- Idempotency keys starting with "drop:" belong to drop-worker's own producers (scheduler slots,
-- AML follow-ups, payment polls, AISP batches and retries). A caller of the enqueue contract
-- could otherwise pre-insert such a predictable key and suppress the internal job (a
-- scheduled SCA expiry, an AML screening). Internal producers declare themselves for their
-- transaction with job_outbox_as_internal_producer(); every other INSERT or UPDATE of such a
-- key is refused. This guards the contract's callers, not someone who may run arbitrary SQL
-- (database roles are the guard there).
CREATE FUNCTION job_outbox_as_internal_producer() RETURNS boolean LANGUAGE sql AS $$
    SELECT set_config('drop.producer', 'internal', true) = 'internal'
$$;

CREATE FUNCTION job_outbox_reserved_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idempotency_key LIKE 'drop:%'
       AND coalesce(current_setting('drop.producer', true), '') <> 'internal' THEN
        RAISE EXCEPTION 'idempotency keys starting with "drop:" are reserved for drop-worker''s own producers'
            USING ERRCODE = 'check_violation',
                  HINT = 'derive the key from your own change (docs/enqueue.md, "Idempotency key")';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER job_outbox_reserved_keys BEFORE INSERT OR UPDATE OF idempotency_key ON job_outbox
    FOR EACH ROW EXECUTE FUNCTION job_outbox_reserved_keys();

-- A recorded fire always names the outbox row it enqueued (NOT VALID: older rows may not).
ALTER TABLE scheduler_fires
    ADD CONSTRAINT scheduler_fires_fired_enqueued CHECK (status <> 'fired' OR outbox_id IS NOT NULL) NOT VALID;
