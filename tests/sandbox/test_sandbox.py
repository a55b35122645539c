"""The sandbox itself: payment scripts, Sumsub mock behaviour, webhooks into the outbox, faults."""

import json
import time

import httpx
import pytest

from worker.providers import get_neonomics, get_sumsub
from worker.providers.errors import ServerError
from worker.providers.sumsub import verify_webhook_digest
from worker.settings import get_settings


def _pay(key="k"):
    return get_neonomics().initiate_payment(
        idempotency_key=key, consent_id="c", amount_ore=5000, currency="NOK",
        debtor_account={"iban": "NO93"}, creditor_name="X", creditor_account={"bban": "1"})


def _secret() -> bytes:
    return get_settings().sumsub_webhook_secret.get_secret_value().encode()


def test_rejected_payment_script(sandbox):
    sandbox.config(payment_script=["RCVD", "ACTC", "RJCT"])
    pay = _pay()
    nc = get_neonomics()
    assert [nc.get_payment_status(pay.payment_id).transaction_status for _ in range(3)] == ["ACTC", "RJCT", "RJCT"]


def test_pinned_status_and_sca_page(sandbox):
    pay = _pay()
    sandbox.set_payment(pay.payment_id, status="PDNG")
    assert get_neonomics().get_payment_status(pay.payment_id).transaction_status == "PDNG"
    page = httpx.get(pay.sca_redirect, params={"result": "ok"})
    assert page.status_code == 200
    assert get_neonomics().get_payment_status(pay.payment_id).transaction_status == "ACSC"


def test_seeded_mock_review_matches_seed_001(sandbox):
    """90 % approval, risk 15 / 85, rejection DOCUMENT_UNREADABLE of type RETRY."""
    sandbox.config(seed=1234)
    answers = []
    for i in range(200):
        applicant = sandbox.create_applicant(f"usr_{i}")
        record = sandbox.review(applicant["id"])  # the mock draws the answer
        event = json.loads(record["payload"]["body"])
        answers.append(event["reviewResult"]["reviewAnswer"])
        if event["reviewResult"]["reviewAnswer"] == "GREEN":
            assert event["riskScore"] == 15
        else:
            assert event["riskScore"] == 85
            assert event["reviewResult"]["rejectLabels"] == ["DOCUMENT_UNREADABLE"]
            assert event["reviewResult"]["reviewRejectType"] == "RETRY"
    assert 165 <= answers.count("GREEN") <= 195


def test_default_review_delay_is_three_seconds(sandbox):
    assert sandbox.config()["review_delay_s"] == 3.0
    assert sandbox.config()["approval_rate"] == 0.9


def test_submit_emits_pending_then_reviewed_after_the_delay(sandbox):
    sandbox.config(review_delay_s=0.4)
    sc = get_sumsub()
    applicant = sc.create_applicant("usr_flow", "basic-kyc-level")
    submitted = time.monotonic()
    sc._signed("submit", "POST", f"/resources/applicants/{applicant.applicant_id}/status/pending")
    assert sc.get_applicant_status(applicant.applicant_id).review_status == "pending"
    assert [json.loads(w["payload"]["body"])["type"] for w in sandbox.webhooks()] == ["applicantPending"]
    while len(sandbox.webhooks()) < 2:
        assert time.monotonic() - submitted < 5
        time.sleep(0.05)
    assert time.monotonic() - submitted >= 0.4
    reviewed = json.loads(sandbox.webhooks()[1]["payload"]["body"])
    assert reviewed["type"] == "applicantReviewed" and reviewed["applicantId"] == applicant.applicant_id
    assert sc.get_applicant_status(applicant.applicant_id).review_status == "completed"


@pytest.mark.parametrize("alg", ["HMAC_SHA1_HEX", "HMAC_SHA256_HEX", "HMAC_SHA512_HEX"])
def test_webhooks_are_signed_correctly(sandbox, alg):
    applicant = sandbox.create_applicant("usr_sig")
    sandbox.config(webhook_alg=alg)
    payload = sandbox.review(applicant["id"], "GREEN")["payload"]
    headers = payload["headers"]
    assert headers["X-Payload-Digest-Alg"] == alg
    assert verify_webhook_digest(_secret(), payload["body"].encode(), headers["X-Payload-Digest"], alg)


def test_forged_webhook_does_not_verify(sandbox):
    payload = sandbox.emit_webhook({"type": "applicantReviewed", "applicantId": "x"}, forge=True)["payload"]
    assert not verify_webhook_digest(_secret(), payload["body"].encode(), payload["headers"]["X-Payload-Digest"],
                                     payload["headers"]["X-Payload-Digest-Alg"])


def test_webhook_lands_in_the_outbox_like_the_web_tier(sandbox, sql):
    applicant = sandbox.create_applicant("usr_db", applicant_id="5f9e1b2c3d4e5f6a7b8c9d0e")
    record = sandbox.review(applicant["id"], "GREEN")
    assert record["outbox"] == "inserted"
    rows = sql("SELECT job, payload, idempotency_key FROM job_outbox")
    assert len(rows) == 1 and rows[0]["job"] == "kyc.sumsub_webhook"
    payload = rows[0]["payload"]
    assert set(payload) == {"body", "headers", "received_at"}
    body = payload["body"]
    assert body == record["payload"]["body"]  # byte-exact through jsonb (it is a string)
    assert verify_webhook_digest(_secret(), body.encode(), payload["headers"]["X-Payload-Digest"],
                                 payload["headers"]["X-Payload-Digest-Alg"])
    event = json.loads(body)
    assert (event["type"], event["applicantId"], event["reviewResult"]["reviewAnswer"]) == (
        "applicantReviewed", "5f9e1b2c3d4e5f6a7b8c9d0e", "GREEN")
    # The same body again is one outbox row (the web tier's idempotency key); a resend with its
    # own key is a second delivery.
    assert sandbox.emit_webhook(raw_body=body)["outbox"] == "duplicate"
    assert sandbox.emit_webhook(raw_body=body, idempotency_key="resend-2")["outbox"] == "inserted"
    assert len(sql("SELECT id FROM job_outbox")) == 2


def test_fault_count_rate_and_latency(sandbox, monkeypatch):
    monkeypatch.setenv("DROP_BREAKER_FAIL_MAX", "1000")  # let every failure through to be counted
    get_settings.cache_clear()
    sandbox.config(seed=7)
    sandbox.fault("neonomics.status", status=500, rate=0.5)
    pay = _pay()
    failures = 0
    for _ in range(40):
        try:
            get_neonomics().get_payment_status(pay.payment_id)
        except ServerError:
            failures += 1
    assert 8 <= failures <= 32
    sandbox.clear_faults()
    sandbox.fault("neonomics.balances", latency_ms=300, count=1)
    started = time.monotonic()
    get_neonomics().get_balances("a", "c")
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    get_neonomics().get_balances("a", "c")
    assert time.monotonic() - started < 0.3
    assert [f["hits"] for f in sandbox.faults()] == [1]


def test_requests_are_recorded_without_bodies(sandbox):
    get_neonomics().get_balances("acc-r", "consent-r", psu_ip="10.1.2.3")
    recorded = sandbox.requests("neonomics.balances")[0]
    assert recorded["x_consent_id"] == "consent-r" and recorded["psu_ip_address"] is True
    assert "10.1.2.3" not in json.dumps(sandbox.requests())
    sandbox.clear_requests()
    assert sandbox.count() == 0


def test_admin_rejects_unknown_config(sandbox):
    with pytest.raises(httpx.HTTPStatusError):
        sandbox.config(no_such_knob=1)


# --- the sandbox is no signing oracle and never runs where it could do harm ------------------


def run_sandbox(*args: str, **env: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "sandbox", *args], cwd=root, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_sandbox_refuses_to_start_outside_development():
    proc = run_sandbox("--port", "0", DROP_ENV="staging")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sandbox: the sandbox runs only with DROP_ENV=development (it is staging)"]


def test_sandbox_refuses_a_non_loopback_bind():
    proc = run_sandbox("--host", "0.0.0.0", "--port", "0")
    assert proc.returncode == 2 and "loopback" in proc.stderr


def test_sandbox_admin_api_refuses_a_forged_kyc_approval_without_its_token(sandbox, sql):
    import httpx

    forged = {"event": {"type": "applicantReviewed", "applicantId": "a1", "reviewResult": {"reviewAnswer": "GREEN"}}}
    anonymous = httpx.post(f"{sandbox.url}/_admin/sumsub/webhooks", json=forged, timeout=5)
    assert anonymous.status_code == 401
    wrong = httpx.post(f"{sandbox.url}/_admin/sumsub/webhooks", json=forged, timeout=5,
                       headers={"X-Sandbox-Admin-Token": "guess"})
    assert wrong.status_code == 401
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 0
    assert httpx.get(f"{sandbox.url}/_admin/health", timeout=5).status_code == 200  # liveness stays open


def test_sandbox_never_shows_secrets(sandbox):
    from tests.conftest_sandbox import SANDBOX_ENV

    shown = json.dumps(sandbox.config())
    for name in ("NEONOMICS_CLIENT_SECRET", "SUMSUB_APP_TOKEN", "SUMSUB_SECRET_KEY", "SUMSUB_WEBHOOK_SECRET"):
        assert SANDBOX_ENV[name] not in shown, name


def test_demo_refuses_to_run_outside_development():
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "monitoring.cli", "demo", "--no-watch"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DROP_ENV": "staging"})
    assert proc.returncode == 2 and "only with DROP_ENV=development" in proc.stderr
