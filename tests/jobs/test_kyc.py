"""kyc.sumsub_webhook and kyc.aml_check against real PostgreSQL/Redis and the sandbox over HTTP.

Most tests call the job function (`process_webhook` / `run_aml_check`) directly: same code, same
database, no Redis hop. The end-to-end tests go sandbox → job_outbox → relay → Redis → worker.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

import jobs
from jobs.kyc import process_webhook, run_aml_check
from jobs.kyc_rules import (
    NOTIFY_APPROVED,
    NOTIFY_REJECTED,
    NOTIFY_RESET,
    NOTIFY_RETRY,
    KycPermanentError,
    MalformedWebhook,
    UnknownApplicant,
    WebhookSecretMissing,
)
from tests.conftest import wait_for
from tests.monitoring.conftest import Receiver, _start_receiver
from worker.outcomes import RunLater
from worker.providers.sumsub import webhook_digest
from worker.settings import get_settings

TEST_SECRET = "kyc-test-webhook-secret"
APPLICANT = "5f9e1b2c3d4e5f6a7b8c9d0e"
USER = "usr_abc123def456gh78"
BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def secret(db, monkeypatch):
    monkeypatch.setenv("SUMSUB_WEBHOOK_SECRET", TEST_SECRET)
    get_settings.cache_clear()
    yield TEST_SECRET
    get_settings.cache_clear()


@pytest.fixture
def user(sql, secret):
    add_user(sql, USER, APPLICANT)
    return USER


def add_user(sql, user_id: str, applicant_id: str, status: str = "pending") -> None:
    sql("INSERT INTO users (id, first_name, last_name, kyc_status, kyc_applicant_id) "
        "VALUES (%s, 'Kari', 'Nordmann', %s, %s)", (user_id, status, applicant_id))


def event(kind: str = "GREEN", *, at: datetime | None = None, applicant: str = APPLICANT, **extra) -> dict:
    """A Sumsub applicantReviewed/other event; kind GREEN, FINAL, RETRY, RED (no type) or a type."""
    at = at or BASE
    body: dict = {"applicantId": applicant, "inspectionId": "insp-1", "correlationId": "req-" + uuid.uuid4().hex[:8],
                  "externalUserId": USER, "levelName": "basic-kyc-level", "sandboxMode": False,
                  "createdAtMs": at.strftime("%Y-%m-%d %H:%M:%S.") + f"{at.microsecond // 1000:03d}"}
    if kind in ("GREEN", "FINAL", "RETRY", "RED"):
        body.update(type="applicantReviewed", reviewStatus="completed",
                    reviewResult={"reviewAnswer": "GREEN" if kind == "GREEN" else "RED", "rejectLabels": []})
        if kind in ("FINAL", "RETRY"):
            body["reviewResult"].update(reviewRejectType=kind, rejectLabels=["DOCUMENT_UNREADABLE"])
    else:
        body.update(type=kind, reviewStatus="pending")
    body.update(extra)
    return body


def signed(body: dict | str, alg: str | None = "HMAC_SHA256_HEX", key: str | None = None) -> dict:
    raw = body if isinstance(body, str) else json.dumps(body)
    secret = key or get_settings().sumsub_webhook_secret.get_secret_value()
    headers = {"X-Payload-Digest": webhook_digest(secret.encode(), raw.encode(), alg)}
    if alg:
        headers["X-Payload-Digest-Alg"] = alg
    return {"body": raw, "headers": headers, "received_at": datetime.now(UTC).isoformat()}


def deliver(body: dict | str, **kw) -> str:
    return process_webhook(**signed(body, **kw))


def counts(sql=None) -> dict[str, int]:
    """Row counts and every user's status (through the pool: fuzz examples call this a lot)."""
    from db.pool import transaction

    with transaction() as conn:
        return conn.execute("""SELECT (SELECT count(*) FROM processed_events) AS processed,
                         (SELECT count(*) FROM screening_results) AS screening,
                         (SELECT count(*) FROM notifications) AS notifications,
                         (SELECT count(*) FROM audit_log) AS audit,
                         (SELECT count(*) FROM audit_log WHERE action = 'kyc.webhook_rejected') AS rejected,
                         (SELECT count(*) FROM job_outbox) AS outbox,
                         (SELECT count(*) FROM dead_letters) AS dead,
                         (SELECT string_agg(id || '=' || kyc_status || '@' || COALESCE(kyc_event_at::text, '-'),
                                 ',' ORDER BY id) FROM users) AS users""").fetchone()


def status(sql, user_id: str = USER) -> str:
    return sql("SELECT kyc_status FROM users WHERE id = %s", (user_id,))[0]["kyc_status"]


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def slack(monkeypatch, redis_namespace):
    """Alerts go to a local Slack-compatible receiver (as in tests/monitoring)."""
    from worker.slack import reset_notifier

    receiver = Receiver()
    receiver.server = _start_receiver(receiver)
    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"{receiver.url}/services/T000/B000/secret-token")
    monkeypatch.setenv("DROP_SLACK_MIN_INTERVAL_S", "0.05")
    get_settings.cache_clear()
    reset_notifier()
    yield receiver
    reset_notifier()
    receiver.server.shutdown()
    receiver.server.server_close()


# --- the seed's action table --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status_after", "result", "notification", "action", "aml"),
    [
        ("GREEN", "approved", "approved", NOTIFY_APPROVED, "kyc.approved", False),
        ("FINAL", "rejected", "rejected", NOTIFY_REJECTED, "kyc.rejected", True),
        ("RED", "rejected", "rejected", NOTIFY_REJECTED, "kyc.rejected", True),
        ("RETRY", "pending", "retry", NOTIFY_RETRY, "kyc.retry_requested", False),
        ("applicantPending", "pending", None, None, "kyc.pending", False),
        ("applicantOnHold", "pending", None, None, "kyc.on_hold", False),
        ("applicantPersonalInfoChanged", "pending", None, None, "kyc.event_recorded", False),
    ],
)
def test_every_row_of_the_action_table(sql, user, kind, status_after, result, notification, action, aml):
    outcome = deliver(event(kind))
    assert outcome == ("applied" if result else "audit_only")
    assert status(sql) == status_after
    screening = sql("SELECT screening_type, result, provider_ref FROM screening_results")
    assert screening == ([{"screening_type": "kyc", "result": result, "provider_ref": APPLICANT}] if result else [])
    assert [r["message"] for r in sql("SELECT message FROM notifications")] == ([notification] if notification else [])
    audit = sql("SELECT user_id, action, details FROM audit_log")
    assert [(a["user_id"], a["action"]) for a in audit] == [(USER, action)]
    assert audit[0]["details"]["applicant_id"] == APPLICANT
    assert sql("SELECT count(*) AS n FROM processed_events WHERE consumer_group = 'kyc.sumsub_webhook'")[0]["n"] == 1
    outbox = sql("SELECT job, payload, idempotency_key FROM job_outbox")
    if aml:
        assert [(o["job"], o["payload"]["applicant_id"], o["payload"]["user_id"]) for o in outbox] == [
            ("kyc.aml_check", APPLICANT, USER)]
        assert outbox[0]["idempotency_key"] == "drop:kyc.aml_check:" + outbox[0]["payload"]["event_id"]
    else:
        assert outbox == []


def test_end_to_end_sandbox_review_through_outbox_relay_and_worker(sql, sandbox, worker, relay):
    applicant = sandbox.create_applicant(USER)["id"]
    add_user(sql, USER, applicant)
    sandbox.review(applicant, "GREEN")
    wait_for(lambda: status(sql) == "approved", what="GREEN applied")
    wait_for(lambda: sql("SELECT done_at FROM job_outbox")[0]["done_at"], what="outbox row done")
    assert sql("SELECT message FROM notifications") == [{"message": NOTIFY_APPROVED}]
    assert sql("SELECT kyc_event_id FROM users")[0]["kyc_event_id"].startswith("sumsub:")


# --- exactly once -------------------------------------------------------------------------


def test_same_body_five_times_has_its_effects_once(sql, user):
    delivery = signed(event("FINAL"))
    outcomes = [process_webhook(**delivery) for _ in range(5)]
    assert outcomes == ["applied"] + ["duplicate"] * 4
    c = counts(sql)
    assert (c["processed"], c["screening"], c["notifications"], c["audit"], c["outbox"]) == (1, 1, 1, 1, 1)


def test_sumsub_resends_through_the_worker_apply_once(sql, sandbox, worker, relay):
    applicant = sandbox.create_applicant(USER)["id"]
    add_user(sql, USER, applicant)
    ev = {"type": "applicantReviewed", "applicantId": applicant, "createdAtMs": BASE.strftime("%Y-%m-%d %H:%M:%S.001"),
          "reviewResult": {"reviewAnswer": "GREEN"}}
    raw = json.dumps(ev)
    for i in range(5):  # Sumsub's resends: same body, new deliveries (new outbox keys)
        assert sandbox.emit_webhook(raw_body=raw, idempotency_key=f"resend-{i}")["outbox"] == "inserted"
    wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL")[0]["n"] == 5,
             what="5 deliveries done")
    c = counts(sql)
    assert (c["processed"], c["screening"], c["notifications"], c["audit"], c["dead"]) == (1, 1, 1, 1, 0)


def test_two_workers_processing_the_same_event_at_once_apply_it_once(sql, user):
    outcomes: list[str] = []
    lock = threading.Lock()
    for i in range(15):
        delivery = signed(event(["GREEN", "FINAL", "RETRY"][i % 3], at=BASE + timedelta(seconds=i)))
        barrier = threading.Barrier(2)

        def run(d=delivery, b=barrier):
            b.wait()
            outcome = process_webhook(**d)
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(outcomes) == ["applied"] * 15 + ["duplicate"] * 15
    c = counts(sql)
    assert (c["processed"], c["screening"], c["notifications"], c["audit"], c["outbox"]) == (15, 15, 15, 15, 5)
    assert status(sql) == "pending"  # the newest event (i=14) is a RETRY


# --- ordering -----------------------------------------------------------------------------


def test_newer_green_then_older_red_stays_approved(sql, user):
    assert deliver(event("GREEN", at=BASE + timedelta(minutes=5))) == "applied"
    assert deliver(event("FINAL", at=BASE)) == "superseded"
    assert status(sql) == "approved"
    assert [r["message"] for r in sql("SELECT message FROM notifications")] == [NOTIFY_APPROVED]
    assert [r["result"] for r in sql("SELECT result FROM screening_results")] == ["approved"]
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 0  # no AML for a superseded RED
    assert [r["action"] for r in sql("SELECT action FROM audit_log ORDER BY id")] == [
        "kyc.approved", "kyc.review_superseded"]


def test_older_red_then_newer_green_applies_both_in_order(sql, user):
    assert deliver(event("FINAL", at=BASE)) == "applied"
    assert status(sql) == "rejected"
    assert deliver(event("GREEN", at=BASE + timedelta(milliseconds=1))) == "applied"
    assert status(sql) == "approved"
    assert [r["message"] for r in sql("SELECT message FROM notifications ORDER BY id")] == [
        NOTIFY_REJECTED, NOTIFY_APPROVED]
    assert [r["details"]["from"] + ">" + r["details"]["to"] for r in sql("SELECT details FROM audit_log ORDER BY id")] \
        == ["pending>rejected", "rejected>approved"]


def test_ordering_compares_times_across_formats(sql, user):
    newer = BASE + timedelta(seconds=1)
    ms = int(newer.timestamp() * 1000)
    assert deliver(event("GREEN", createdAtMs=ms)) == "applied"  # epoch ms int
    older = event("RETRY", createdAtMs=None, createdAt=BASE.isoformat().replace("+00:00", "Z"))
    assert deliver(older) == "superseded"  # ISO 8601, one second older
    assert deliver(event("FINAL", createdAtMs=str(ms + 1))) == "applied"  # epoch ms as a string
    assert status(sql) == "rejected"


def test_audit_only_events_never_touch_the_ordering_guard(sql, user):
    assert deliver(event("GREEN", at=BASE)) == "applied"
    assert deliver(event("applicantPending", at=BASE + timedelta(hours=1))) == "audit_only"
    assert deliver(event("FINAL", at=BASE + timedelta(minutes=1))) == "applied"
    assert status(sql) == "rejected"


# --- rejections and dead letters ----------------------------------------------------------


def test_forged_webhook_through_the_worker_is_rejected_recorded_and_not_retried(sql, sandbox, worker, relay):
    add_user(sql, USER, APPLICANT)
    before = metric("drop_kyc_webhook_rejections_total", reason="mismatch")
    sandbox.emit_webhook(event("GREEN"), forge=True)
    wait_for(lambda: sql("SELECT done_at FROM job_outbox")[0]["done_at"], what="rejected delivery done")
    audit = sql("SELECT user_id, action, details FROM audit_log")
    assert len(audit) == 1 and audit[0]["action"] == "kyc.webhook_rejected" and audit[0]["user_id"] is None
    assert audit[0]["details"]["reason"] == "mismatch" and audit[0]["details"]["alg"] == "HMAC_SHA256_HEX"
    assert APPLICANT not in json.dumps(audit[0]["details"])  # nothing from the body
    c = counts(sql)
    assert (c["processed"], c["screening"], c["notifications"], c["dead"]) == (0, 0, 0, 0)
    assert status(sql) == "pending"
    assert metric("drop_kyc_webhook_rejections_total", reason="mismatch") == before + 1


@pytest.mark.parametrize("alg", ["HMAC_SHA1_HEX", "HMAC_SHA256_HEX", "HMAC_SHA512_HEX", None])
def test_each_digest_algorithm_signed_by_the_sandbox(sql, sandbox, alg):
    add_user(sql, USER, APPLICANT)
    record = sandbox.emit_webhook(event("GREEN"), alg=alg or "HMAC_SHA256_HEX")
    payload = record["payload"]
    if alg is None:  # absent header → SHA-256
        del payload["headers"]["X-Payload-Digest-Alg"]
    assert process_webhook(**payload) == "applied"
    assert status(sql) == "approved"


def test_missing_digest_and_unknown_algorithm_are_rejected(sql, user):
    d = signed(event("GREEN"))
    assert process_webhook(d["body"], {}, None) == "rejected"
    assert process_webhook(d["body"], {**d["headers"], "X-Payload-Digest-Alg": "HMAC_MD5_HEX"}) == "rejected"
    reasons = [r["details"]["reason"] for r in sql("SELECT details FROM audit_log ORDER BY id")]
    assert reasons == ["missing_digest", "unknown_algorithm"]
    assert status(sql) == "pending"


def test_huge_body_is_rejected_with_its_reason(sql, user):
    body = json.dumps({**event("GREEN"), "padding": "x" * (1024 * 1024)})
    assert deliver(body) == "rejected"
    assert sql("SELECT details->>'reason' AS r FROM audit_log")[0]["r"] == "too_large"


def test_unknown_applicant_is_dead_lettered_once_with_a_clear_reason_and_replayable(sql, secret, broker, worker):
    payload = signed(event("GREEN", applicant="unknownapplicant01"))
    jobs.enqueue("kyc.sumsub_webhook", payload, idempotency_key="k-unknown")
    from worker.relay import relay_once

    relay_once()
    dead = wait_for(lambda: sql("SELECT job, reason, retries FROM dead_letters"), what="dead letter")
    # retries = 0: a permanent failure is failed at its first attempt, never retried.
    assert dead == [{"job": "kyc.sumsub_webhook", "retries": 0,
                     "reason": "UnknownApplicant: no user has Sumsub applicant unknownapplicant01"}]
    c = counts(sql)
    assert (c["processed"], c["screening"], c["notifications"], c["audit"]) == (0, 0, 0, 0)
    # The web tier stores the applicant late: the same event applies after a replay.
    add_user(sql, USER, "unknownapplicant01")
    assert process_webhook(**payload) == "applied"


def test_signed_but_malformed_bodies_are_dead_lettered_with_the_reason(sql, secret, broker, worker):
    from worker.relay import relay_once

    jobs.enqueue("kyc.sumsub_webhook", signed("{not json"), idempotency_key="k-bad")
    jobs.enqueue("kyc.sumsub_webhook", {"headers": {}}, idempotency_key="k-nobody")
    relay_once()
    dead = wait_for(lambda: (r := sql("SELECT reason FROM dead_letters ORDER BY reason")) and len(r) == 2 and r,
                    what="two dead letters")
    assert [d["reason"] for d in dead] == ["MalformedWebhook: body is not valid JSON",
                                          "MalformedWebhook: payload.body must be the raw body as a string"]
    assert counts(sql)["audit"] == 0


def test_missing_secret_keeps_the_webhook_for_replay(sql, db, monkeypatch):
    monkeypatch.delenv("SUMSUB_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("SUMSUB_SECRET_KEY", raising=False)
    get_settings.cache_clear()
    with pytest.raises(WebhookSecretMissing):
        process_webhook(**signed(event("GREEN"), key="whatever"))
    assert counts(sql)["audit"] == 0


# --- fuzzing (hypothesis) -----------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12)
def mostly(valid: st.SearchStrategy, fuzzed: st.SearchStrategy, in_ten: int = 8) -> st.SearchStrategy:
    """`valid` in `in_ten` of ten draws, else `fuzzed` (one_of would weigh them equally)."""
    return st.integers(0, 9).flatmap(lambda i: valid if i < in_ten else fuzzed)


PAST_MS = st.integers(min_value=1_600_000_000_000, max_value=int(BASE.timestamp() * 1000))
valid_ms = st.one_of(PAST_MS, PAST_MS.map(str), PAST_MS.map(
    lambda ms: datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]))
ms_values = mostly(valid_ms, st.one_of(
    st.integers(min_value=-10, max_value=10**17), st.text(max_size=25), st.none(), st.floats(allow_nan=True),
    st.booleans(), st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2030, 1, 1)).map(
        lambda d: d.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])))
LABELS = st.sampled_from(["SANCTIONS", "PEP", "FORGERY", "DOCUMENT_UNREADABLE", "BAD_SELFIE"])
valid_review = st.fixed_dictionaries({"reviewAnswer": st.sampled_from(["GREEN", "RED"])}, optional={
    "reviewRejectType": st.sampled_from(["FINAL", "RETRY"]), "rejectLabels": st.lists(LABELS, max_size=3)})
VALID_TYPES = st.sampled_from(["applicantReviewed", "applicantReviewed", "applicantPending", "applicantOnHold",
                               "applicantCreated"])
# Mostly well-formed events with one or two fields fuzzed, so every outcome is reached.
events = st.fixed_dictionaries(
    {"type": mostly(VALID_TYPES, st.text(max_size=12) | json_values),
     "applicantId": mostly(st.just(APPLICANT), st.just("otherapplicant") | json_values),
     "createdAtMs": ms_values},
    optional={
        "createdAt": st.one_of(st.text(max_size=30), st.datetimes(max_value=datetime(2026, 1, 1)).map(
            lambda d: d.isoformat() + "Z"), json_values),
        "correlationId": st.text(max_size=12) | json_values,
        "reviewResult": mostly(valid_review, json_values | st.fixed_dictionaries({}, optional={
            "reviewAnswer": st.sampled_from(["GREEN", "RED", "green", "YELLOW", ""]) | json_values,
            "reviewRejectType": st.sampled_from(["FINAL", "RETRY", "EXTERNAL"]) | json_values,
            "rejectLabels": st.lists(LABELS | st.text(max_size=8) | st.integers(), max_size=4) | json_values,
        })),
        "info": st.fixed_dictionaries({"firstName": st.text(max_size=10), "email": st.emails()}),
    },
)
any_body = mostly(st.one_of(st.text(max_size=200), json_values.map(json.dumps), events.map(json.dumps)),
                  st.one_of(st.binary(max_size=50), st.none(), st.integers()), in_ten=9)
any_headers = mostly(st.one_of(
    st.fixed_dictionaries({}, optional={
        "X-Payload-Digest": st.one_of(st.text(max_size=130), st.none(), st.integers(),
                                      st.sampled_from(["00" * 32, "ab" * 64, "ZZ" * 20])),
        "X-Payload-Digest-Alg": st.one_of(st.sampled_from(["HMAC_SHA1_HEX", "HMAC_SHA256_HEX", "HMAC_SHA512_HEX",
                                                           "hmac_sha256_hex", "HMAC_MD5_HEX", ""]),
                                          st.text(max_size=20), st.none()),
    }),
    st.fixed_dictionaries({"X-Payload-Digest": st.text(alphabet="0123456789abcdef", min_size=40, max_size=128)},
                          optional={"X-Payload-Digest-Alg": st.sampled_from(["HMAC_SHA1_HEX", "HMAC_SHA512_HEX"])}),
    st.dictionaries(st.text(max_size=20), json_values, max_size=3),
), st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=5), max_size=2)), in_ten=9)


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@fuzz(2500)
@given(body=any_body, headers=any_headers, received_at=json_values)
def test_fuzz_unsigned_deliveries_never_crash_and_change_nothing(sql, user, body, headers, received_at):
    try:
        outcome = process_webhook(body, headers, received_at)
    except MalformedWebhook:  # contract violations (body not text, headers not an object)
        assert not isinstance(body, str) or not isinstance(headers, dict | type(None))
        hypothesis.event("malformed payload")
        return
    assert outcome == "rejected"
    hypothesis.event(outcome)
    c = counts(sql)
    assert (c["processed"], c["screening"], c["notifications"], c["outbox"]) == (0, 0, 0, 0)
    assert c["users"].startswith(f"{USER}=pending@-")
    assert c["audit"] == c["rejected"]


EFFECTS = {"applied", "audit_only", "superseded", "duplicate", "stale"}


@fuzz(1500)
@given(ev=events, alg=st.sampled_from(["HMAC_SHA1_HEX", "HMAC_SHA256_HEX", "HMAC_SHA512_HEX", None]))
def test_fuzz_signed_events_give_typed_outcomes_and_invalid_ones_change_nothing(sql, user, ev, alg):
    before = counts(sql)
    try:
        outcome = process_webhook(**signed(ev, alg=alg))
    except KycPermanentError as error:  # malformed or unknown applicant: a dead letter, no change
        assert counts(sql) == before
        assert isinstance(error, MalformedWebhook | UnknownApplicant)
        hypothesis.event(type(error).__name__)
        assert "Kari" not in str(error)
        return
    assert outcome in EFFECTS
    hypothesis.event(outcome)
    after = counts(sql)
    if outcome == "duplicate":
        assert after == before
    elif outcome == "stale":  # older than the replay window: recorded, nothing applied
        assert after == {**before, "audit": before["audit"] + 1}
    else:
        assert after["processed"] == before["processed"] + 1 and after["audit"] == before["audit"] + 1
    assert after["users"].split("=")[1].split("@")[0] in ("not_started", "pending", "approved", "rejected")


# --- AML follow-up ------------------------------------------------------------------------


def test_red_final_with_sanctions_runs_aml_through_the_outbox_and_alerts_compliance(sql, sandbox, slack, worker,
                                                                                     relay):
    applicant = sandbox.create_applicant(USER)["id"]
    add_user(sql, USER, applicant)
    sandbox.review(applicant, "RED", reject_type="FINAL", labels=["SANCTIONS", "PEP"])
    aml = wait_for(lambda: sql("SELECT result, reject_labels, provider_ref FROM screening_results "
                               "WHERE screening_type = 'aml'"), what="aml row")
    assert aml == [{"result": "hit", "reject_labels": ["SANCTIONS", "PEP"], "provider_ref": applicant}]
    assert status(sql) == "rejected"
    [alert] = slack.wait(1)
    text = alert.json()["text"]
    assert "AML compliance hit: sanctions, pep" in text and applicant in text and "SANCTIONS, PEP" in text
    assert "Kari" not in text and "Nordmann" not in text and USER not in text
    assert sandbox.count("sumsub.status") == 1
    wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NULL")[0]["n"] == 0,
             what="both jobs done")


def test_aml_check_is_idempotent_and_clear_labels_do_not_alert(sql, sandbox, slack):
    applicant = sandbox.create_applicant(USER)["id"]
    add_user(sql, USER, applicant)
    sandbox.review(applicant, "RED", reject_type="FINAL", labels=["DOCUMENT_UNREADABLE"])
    assert run_aml_check(applicant, USER, "ev-1") == "clear"
    assert run_aml_check(applicant, USER, "ev-1") == "duplicate"
    assert sql("SELECT result FROM screening_results WHERE screening_type = 'aml'") == [{"result": "clear"}]
    assert sandbox.count("sumsub.status") == 1  # the rerun did not even ask Sumsub
    assert [r["action"] for r in sql("SELECT action FROM audit_log")] == ["kyc.aml_checked"]
    assert slack.requests == []


def test_aml_retries_sumsub_errors_then_succeeds(sql, sandbox, slack, broker, worker):
    applicant = sandbox.create_applicant(USER)["id"]
    add_user(sql, USER, applicant)
    sandbox.review(applicant, "RED", reject_type="FINAL", labels=["ADVERSE_MEDIA"])
    sandbox.fault("sumsub.status", status=503, count=2)
    # The policy's retries with short backoffs (the 1/2/4 s timing is tested in tests/worker).
    aml_check = jobs.app.actors["kyc.aml_check"]
    aml_check.send_with_options(kwargs={"applicant_id": applicant, "user_id": USER, "event_id": "ev-retry"},
                                         min_backoff=100, max_backoff=400)
    wait_for(lambda: sql("SELECT result FROM screening_results"), timeout=20, what="aml row after retries")
    assert sandbox.count("sumsub.status") == 3
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0
    assert "AML compliance hit: adverse_media" in slack.wait(1)[0].json()["text"]


def test_aml_gives_up_after_the_last_retry_dead_letters_and_alerts(sql, sandbox, slack, broker, worker):
    applicant = sandbox.create_applicant(USER)["id"]
    add_user(sql, USER, applicant)
    sandbox.fault("sumsub.status", status=503)
    # A message that already used its 3 retries: the next transient failure is final.
    aml_check = jobs.app.actors["kyc.aml_check"]
    aml_check.send_with_options(kwargs={"applicant_id": applicant, "user_id": USER, "event_id": "ev-x"},
                                         retries=3)
    dead = wait_for(lambda: sql("SELECT job, reason FROM dead_letters"), what="dead letter")
    assert dead[0]["job"] == "kyc.aml_check" and dead[0]["reason"].startswith("ServerError: sumsub.status HTTP 503")
    text = slack.wait(1)[0].json()["text"]
    assert "AML check could not run" in text and applicant in text
    assert sql("SELECT count(*) AS n FROM screening_results")[0]["n"] == 0


def test_aml_reschedules_while_the_sumsub_circuit_is_open(sql, sandbox):
    applicant = sandbox.create_applicant(USER)["id"]
    add_user(sql, USER, applicant)
    sandbox.fault("sumsub.status", status=503)
    from worker.providers.errors import ServerError

    for _ in range(3):  # outside a worker: each transient failure propagates (Dramatiq retries it)
        with pytest.raises(ServerError):
            run_aml_check(applicant, USER, "ev-open")
    later = run_aml_check(applicant, USER, "ev-open")
    assert isinstance(later, RunLater) and 1_000 <= later.delay_ms <= 62_000
    assert sandbox.count("sumsub.status") == 3  # the open circuit sent nothing


def test_aml_job_with_bad_payload_or_unknown_applicant_is_permanent(sql, secret):
    with pytest.raises(KycPermanentError):
        run_aml_check(None, None, "ev")
    with pytest.raises(KycPermanentError):
        run_aml_check(APPLICANT, None, None)
    with pytest.raises(UnknownApplicant):
        run_aml_check(APPLICANT, USER, "ev")


# --- privacy, metrics, the monitor's approval rate ----------------------------------------


def test_no_personal_data_in_logs_dead_letters_or_audit(sql, secret, broker, worker, relay, caplog):
    caplog.set_level(logging.DEBUG)
    add_user(sql, USER, APPLICANT)
    pii = {"firstName": "Kari", "lastName": "Nordmannsen", "pid": "01017012345", "email": "kari.n@example.no",
           "moderationComment": "Kari Nordmannsen, born 01.01.70"}
    for i, (kind, applicant) in enumerate([("GREEN", APPLICANT), ("FINAL", "nobodyapplicant")]):
        jobs.enqueue("kyc.sumsub_webhook", signed(event(kind, applicant=applicant, info=pii, **pii)),
                     idempotency_key=f"pii-{i}")
    jobs.enqueue("kyc.sumsub_webhook", signed(json.dumps(pii)[:-1]), idempotency_key="pii-bad")  # not JSON
    forged = signed(event("GREEN", info=pii), key="wrong")
    jobs.enqueue("kyc.sumsub_webhook", forged, idempotency_key="pii-forged")
    wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL OR error IS NOT NULL"
                         )[0]["n"] == 4, what="four deliveries finished")
    stored = json.dumps(sql("SELECT reason FROM dead_letters"), default=str) + json.dumps(
        sql("SELECT details FROM audit_log"), default=str)
    logged = caplog.text + " ".join(str(r.args) for r in caplog.records)
    for leaked in ("Nordmannsen", "01017012345", "kari.n@example.no", "born"):
        assert leaked not in logged
        assert leaked not in stored
    assert status(sql) == "approved"


def test_metrics_and_the_monitors_approval_rate(sql, user):
    from worker.probes import database_state

    applied = metric("drop_kyc_webhooks_total", outcome="applied")
    dup = metric("drop_kyc_webhooks_total", outcome="duplicate")
    add_user(sql, "u2", "applicant2")
    add_user(sql, "u3", "applicant3")
    deliver(event("GREEN"))
    d = signed(event("FINAL", applicant="applicant2"))
    process_webhook(**d)
    process_webhook(**d)
    deliver(event("RETRY", applicant="applicant3"))
    assert metric("drop_kyc_webhooks_total", outcome="applied") == applied + 3
    assert metric("drop_kyc_webhooks_total", outcome="duplicate") == dup + 1
    s = database_state()
    assert (s["kyc_approved"], s["kyc_reviewed"]) == (1, 3)  # approved / (approved+rejected+retry)


# --- replay window and Sumsub taking a verification back --------------------------------------


def texts(slack) -> str:
    return json.dumps([r.json() for r in slack.requests])


def test_captured_approval_25_hours_old_is_recorded_stale_not_applied(sql, user, slack):
    old = datetime.now(UTC) - timedelta(hours=25)
    assert deliver(event("GREEN", at=old)) == "stale"
    assert status(sql) == "pending"
    assert [a["action"] for a in sql("SELECT action FROM audit_log")] == ["kyc.event_stale"]
    assert sql("SELECT count(*) AS n FROM processed_events")[0]["n"] == 0
    assert sql("SELECT count(*) AS n FROM notifications")[0]["n"] == 0
    slack.wait(1)
    assert "Stale Sumsub webhook ignored" in texts(slack)
    # Sumsub's last resend (about 24 h 05 min after the event) is still inside the window.
    assert deliver(event("GREEN", at=datetime.now(UTC) - timedelta(hours=24, minutes=5))) == "applied"


def test_day_old_approval_replayed_after_a_reset_does_not_reapprove(sql, user):
    assert deliver(event("GREEN", at=BASE)) == "applied"
    # A reset that cleared the event-time guard (an operator, or the web tier).
    sql("UPDATE users SET kyc_status = 'pending', kyc_event_at = NULL WHERE id = %s", (USER,))
    captured = event("GREEN", at=datetime.now(UTC) - timedelta(days=1, hours=1))
    assert deliver(captured) == "stale"
    assert status(sql) == "pending"


def test_sumsub_reset_takes_an_approval_back_audits_and_alerts(sql, user, slack):
    assert deliver(event("GREEN", at=BASE)) == "applied"
    assert deliver(event("applicantReset", at=BASE + timedelta(minutes=5))) == "applied"
    assert status(sql) == "not_started"
    audit = sql("SELECT action, details FROM audit_log ORDER BY id")
    assert [a["action"] for a in audit] == ["kyc.approved", "kyc.applicant_reset"]
    assert audit[1]["details"]["from"] == "approved" and audit[1]["details"]["to"] == "not_started"
    assert [r["message"] for r in sql("SELECT message FROM notifications ORDER BY id")][-1] == NOTIFY_RESET
    slack.wait(1)
    assert "KYC applicant reset by Sumsub" in texts(slack) and "Kari" not in texts(slack)
    # A resend of the approval from before the reset stays superseded: the guard kept the reset's time.
    assert deliver(event("GREEN", at=BASE + timedelta(minutes=1), correlationId="req-resend")) == "superseded"
    assert status(sql) == "not_started"


@pytest.mark.parametrize(("kind", "after", "action"), [
    ("applicantDeleted", "not_started", "kyc.applicant_deleted"),
    ("applicantDeactivated", "pending", "kyc.applicant_deactivated"),
])
def test_sumsub_deletion_or_deactivation_takes_an_approval_back(sql, user, slack, kind, after, action):
    assert deliver(event("GREEN", at=BASE)) == "applied"
    assert deliver(event(kind, at=BASE + timedelta(minutes=5))) == "applied"
    assert status(sql) == after
    assert sql("SELECT action FROM audit_log ORDER BY id")[-1]["action"] == action
    slack.wait(1)


def test_workflow_events_as_sumsub_defines_them(sql, user):
    completed = event("GREEN", at=BASE, type="applicantWorkflowCompleted")
    assert deliver(completed) == "applied" and status(sql) == "approved"
    assert deliver(event("applicantWorkflowFailed", at=BASE + timedelta(minutes=1))) == "audit_only"
    assert status(sql) == "approved"
    no_verdict = event("applicantWorkflowCompleted", at=BASE + timedelta(minutes=2))
    assert deliver(no_verdict) == "audit_only"
    with pytest.raises(MalformedWebhook):
        deliver(event("applicantReset", at=BASE, createdAtMs=None))
