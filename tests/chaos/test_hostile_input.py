"""Issue 9 point 6: hostile input — 0 worker crashes, 0 wrong state changes, every rejection
recorded with its reason. Fuzzing goes through the job's direct-call path (same code, same
database); the rest through the outbox, the relay and a real worker process."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobs
from jobs.kyc import process_webhook
from jobs.kyc_rules import KycPermanentError
from tests.conftest import wait_for

from . import workload
from .conftest import figure, scaled

TEXT = st.text(st.characters(codec="utf-8"), max_size=300) | st.text(max_size=50)  # incl. lone surrogates
HEADER_VALUE = st.none() | st.integers() | TEXT | st.sampled_from(
    ["HMAC_SHA1_HEX", "HMAC_SHA256_HEX", "HMAC_SHA512_HEX", "hmac_sha256_hex", "MD5", ""])
HEADERS = st.dictionaries(
    st.sampled_from(["X-Payload-Digest", "x-payload-digest", "X-Payload-Digest-Alg", "x-payload-digest-alg",
                     "Content-Type"]) | TEXT, HEADER_VALUE, max_size=4) | st.none() | st.integers() | TEXT
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4), max_leaves=12)
EVENT_FIELDS = st.fixed_dictionaries({}, optional={
    "applicantId": JSONISH, "type": st.sampled_from(["applicantReviewed", "applicantPending", "x"]) | JSONISH,
    "reviewResult": JSONISH, "createdAtMs": JSONISH | st.integers(-10**20, 10**20), "externalUserId": JSONISH,
    "reviewStatus": JSONISH, "correlationId": JSONISH})


def snapshot(sql) -> list[dict]:
    return sql("SELECT id, kyc_status, kyc_event_at FROM users ORDER BY id")


def test_fuzzed_webhooks_never_crash_and_never_change_state(db, sql, sandbox, capture):
    seeds = capture.seeds
    sql("INSERT INTO users (id, national_id_hash, first_name, last_name, kyc_status, kyc_applicant_id) "
        "VALUES ('usr_fuzz', %s, %s, %s, 'pending', 'appfuzz000000000000000')",
        (seeds.pid_hash, seeds.first_name, seeds.last_name))
    before = snapshot(sql)
    outcomes: dict[str, int] = {}

    def record(outcome: str) -> None:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    @settings(max_examples=scaled(1500), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=TEXT | JSONISH, headers=HEADERS)
    def unsigned(body, headers):
        # Random bodies with random headers: never authentic.
        try:
            outcome = process_webhook(body, headers, "2026-01-01T00:00:00Z")
        except KycPermanentError as error:
            outcome = f"permanent:{type(error).__name__}"
        assert outcome in ("rejected",) or outcome.startswith("permanent:"), outcome
        record(outcome)

    @settings(max_examples=scaled(700), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(event=EVENT_FIELDS, alg=st.sampled_from(["HMAC_SHA1_HEX", "HMAC_SHA256_HEX", "HMAC_SHA512_HEX"]))
    def signed_garbage(event, alg):
        # Authentic (correctly signed) but structurally hostile events: parsed, never trusted.
        try:
            raw = json.dumps(event)
        except (ValueError, TypeError):
            return
        try:
            outcome = process_webhook(**workload.webhook_payload(raw, alg))
        except KycPermanentError as error:
            outcome = f"permanent:{type(error).__name__}"
        record(outcome)

    unsigned()
    signed_garbage()
    # Huge body, invalid UTF-8 (a lone surrogate cannot be encoded), wrong digest, wrong key.
    huge = "x" * (1024 * 1024 + 1)
    good = json.dumps(workload.review_event("appfuzz000000000000000", "usr_fuzz", seeds,
                                            at=datetime.now(UTC) - timedelta(minutes=1)))
    capture.bodies.append(good)
    specials = {
        "too_large": (huge, workload.sign(huge)),
        "bad_encoding": (good[:-1] + "\udc80}", workload.sign(good)),
        "mismatch": (good, {**workload.sign(good), "X-Payload-Digest": "0" * 64}),
        "unknown_algorithm": (good, {**workload.sign(good), "X-Payload-Digest-Alg": "HMAC_MD5_HEX"}),
        "missing_digest": (good, {}),
    }
    for reason, (body, headers) in specials.items():
        assert process_webhook(body, headers) == "rejected", reason
    after = snapshot(sql)
    assert after == before, "a hostile webhook changed a user's KYC state"
    rejected = sql("SELECT details FROM audit_log WHERE action = 'kyc.webhook_rejected'")
    reasons = [r["details"].get("reason") for r in rejected]
    assert len(rejected) == outcomes.get("rejected", 0) + len(specials)
    assert all(reasons), "a rejection without its reason"
    for reason in specials:
        assert reason in reasons, reason
    assert sql("SELECT count(*) AS n FROM notifications")[0]["n"] == 0
    figure("hostile_fuzz", cases=sum(outcomes.values()) + len(specials), outcomes=outcomes,
           rejection_reasons=sorted(set(reasons)), state_changes=0)


def test_hostile_outbox_rows_and_replays_through_a_real_worker(db, sql, sandbox, procs, capture):
    seeds = capture.seeds
    now = datetime.now(UTC)
    sql("INSERT INTO users (id, national_id_hash, first_name, last_name, kyc_status, kyc_applicant_id) "
        "VALUES ('usr_h', %s, %s, %s, 'pending', 'apphostile00000000000')",
        (seeds.pid_hash, seeds.first_name, seeds.last_name))
    newer = workload.webhook_payload(workload.review_event("apphostile00000000000", "usr_h", seeds,
                                                           at=now - timedelta(minutes=1)))
    older = workload.webhook_payload(workload.review_event("apphostile00000000000", "usr_h", seeds,
                                                           at=now - timedelta(hours=3), answer="RED"))
    unknown = workload.webhook_payload(workload.review_event("appnobody000000000000", "usr_x", seeds,
                                                             at=now - timedelta(minutes=1)))
    forged = {**newer, "headers": {**newer["headers"], "X-Payload-Digest": "f" * 64}}
    capture.bodies += [newer["body"], older["body"], unknown["body"]]
    good_rows = [("kyc.sumsub_webhook", newer, "k-newer"), ("kyc.sumsub_webhook", newer, "k-newer-resend"),
                 ("kyc.sumsub_webhook", older, "k-older-replayed")]
    for job, payload, key in good_rows:
        jobs.enqueue(job, payload, idempotency_key=key)
    # Garbage the web tier (any language) could insert directly.
    raw_rows = [
        ("no.such_job", json.dumps({"a": 1}), "unknown job"),
        ("kyc.sumsub_webhook", json.dumps([1, 2, 3]), "payload is not a JSON object"),
        ("pisp.poll_status", json.dumps("just a string"), "payload is not a JSON object"),
        ("aisp.refresh_account", "42", "payload is not a JSON object"),
    ]
    for i, (job, payload, _) in enumerate(raw_rows):
        sql("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES (%s, %s::jsonb, %s)",
            (job, payload, f"raw-{i}"))
    bad_payloads = [
        ("kyc.sumsub_webhook", forged, "forged"),  # rejected: audit row, done, no retry
        ("kyc.sumsub_webhook", unknown, "unknown applicant"),
        ("kyc.sumsub_webhook", {"body": 17, "headers": "nope"}, "body not text"),
        ("kyc.sumsub_webhook", {"unexpected": True}, "no body"),
        ("pisp.poll_status", {"transaction_id": 12345}, "transaction id not text"),
        ("pisp.poll_status", {"transaction_id": "tx_does_not_exist"}, "unknown transaction"),
        ("aisp.refresh_account", {"bank_account_id": "", "initiated_by": "hacker"}, "bad initiator"),
        ("aisp.refresh_account", {"bank_account_id": ["x"], "initiated_by": "user", "psu_ip_address": "999.1.1.1"},
         "bad account/ip"),
        ("kyc.aml_check", {"applicant_id": None}, "aml garbage"),
    ]
    for job, payload, key in bad_payloads:  # past jobs.enqueue's check, as an SQL caller could
        sql("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES (%s, %s::jsonb, %s)",
            (job, json.dumps(payload), f"bad-{key}"))
    total = len(good_rows) + len(raw_rows) + len(bad_payloads)
    worker = procs.worker(threads=2)

    def settled():
        return sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NULL AND error IS NULL")[0]["n"] == 0

    wait_for(settled, timeout=90, interval=0.2, what="every hostile row settled (done or closed with a reason)")
    assert worker.poll() is None, "the worker crashed"
    rows = sql("SELECT job, idempotency_key, done_at IS NOT NULL AS done, error FROM job_outbox ORDER BY id")
    assert len(rows) == total
    by_key = {r["idempotency_key"]: r for r in rows}
    for i, (_, _, reason) in enumerate(raw_rows):
        assert by_key[f"raw-{i}"]["error"].startswith(reason.split()[0]) or reason in by_key[f"raw-{i}"]["error"]
    # The newer GREEN decision stands; the replayed older RED one is recorded as superseded.
    assert sql("SELECT kyc_status FROM users WHERE id = 'usr_h'")[0]["kyc_status"] == "approved"
    assert sql("SELECT count(*) AS n FROM notifications")[0]["n"] == 1
    assert sql("SELECT count(*) AS n FROM audit_log WHERE action = 'kyc.review_superseded'")[0]["n"] == 1
    assert sql("SELECT count(*) AS n FROM audit_log WHERE action = 'kyc.webhook_rejected'")[0]["n"] == 1
    dead = sql("SELECT job, reason FROM dead_letters ORDER BY id")
    assert all(d["reason"] for d in dead)
    assert not any("killed its worker" in d["reason"] for d in dead)
    closed = [r for r in rows if r["error"]]
    # Each bad row is closed with a reason (rejected by the relay, or dead-lettered) or done as
    # a recorded rejection; none is retried forever.
    assert len(closed) == len(raw_rows) + len(dead)
    assert len(dead) == len(bad_payloads) - 1  # all but the forged one (a recorded rejection)
    assert sandbox.count("neonomics.*") == 0
    figure("hostile_outbox", rows=total, relay_rejected=len(raw_rows), dead_lettered=len(dead),
           dead_letter_reasons=sorted({d["reason"][:60] for d in dead}), worker_crashes=0)
