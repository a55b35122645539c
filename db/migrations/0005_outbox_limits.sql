-- A size limit at the door: one row's payload may not exceed 2 MiB of JSON text. A KYC webhook
-- body is capped at 1 MiB inside the job; its JSON-string escaping and the headers fit well
-- under this. Larger rows are refused by PostgreSQL with the constraint's name, before they
-- reach the relay's memory or Redis. NOT VALID: rows already present are not re-checked (they
-- are relayed within the relay's byte budget, or closed with a reason).
ALTER TABLE job_outbox
    ADD CONSTRAINT job_outbox_payload_size CHECK (octet_length(payload::text) <= 2097152) NOT VALID;
