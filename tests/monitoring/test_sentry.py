"""Sentry: envelopes captured at a local receiver carry no personal data and no bodies."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import dramatiq
import pytest
import sentry_sdk

from tests.conftest import wait_for

PID = "01017012345"
EMAIL = "kari.nordmann@example.no"
IBAN = "NO9386011117947"
FIRST, LAST = "Kari", "Nordmannsen"
BODY = json.dumps({"applicantId": "a1", "info": {"firstName": FIRST, "lastName": LAST, "idDocs": PID},
                   "email": EMAIL})
SECRETS = (PID, EMAIL, IBAN, FIRST, LAST, "idDocs", "applicantId")


@dramatiq.actor(max_retries=0, queue_name="monitoring_sentry_test")
def leaky_job(body: str, first_name: str, iban: str) -> None:
    user = {"first_name": first_name, "email": EMAIL}  # a local variable full of PII
    logging.getLogger("jobs.test").error("could not process webhook for %s (%s)", EMAIL, PID)
    raise ValueError(f"bad account {iban} for {user['email']} pid {PID}")


@dramatiq.actor(max_retries=0, queue_name="monitoring_sentry_test", traces_share=0.0)
def untraced_failing_job() -> None:
    logging.getLogger("jobs.test").info("a routine line: no breadcrumb")
    logging.getLogger("jobs.test").warning("a warning: a breadcrumb")
    raise RuntimeError("an error of a job whose traces are never sampled")


def decode_envelope(raw: bytes) -> list[dict]:
    items = []
    lines = raw.split(b"\n")
    i = 1  # line 0 is the envelope header
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        header = json.loads(lines[i])
        payload = lines[i + 1]
        try:
            items.append({"type": header.get("type"), "payload": json.loads(payload)})
        except ValueError:
            items.append({"type": header.get("type"), "payload": payload.decode(errors="replace")})
        i += 2
    return items


@pytest.fixture
def sentry(receiver, monkeypatch) -> Iterator:
    from worker.sentry import init_sentry
    from worker.settings import get_settings

    port = receiver.server.server_address[1]
    monkeypatch.setenv("SENTRY_DSN", f"http://public@127.0.0.1:{port}/1")
    monkeypatch.setenv("DROP_ENV", "staging")
    get_settings.cache_clear()
    assert init_sentry("worker")
    yield receiver
    client = sentry_sdk.get_client()
    client.close(timeout=2)
    sentry_sdk.get_global_scope().set_client(None)


def events(receiver) -> list[dict]:
    sentry_sdk.flush(5)
    out = []
    for req in receiver.requests:
        if req.path != "/api/1/envelope/":
            continue  # the Slack fixture shares this receiver
        out.extend(decode_envelope(req.body))
    return out


def test_job_error_envelope_has_no_pii_or_body_and_carries_request_id(sentry, worker, broker):
    message = leaky_job.send(BODY, FIRST, IBAN)
    wait_for(lambda: any(i["type"] == "event" and i["payload"].get("exception")
                         for i in events(sentry)), what="the job's error event")
    items = events(sentry)
    raw = b"".join(r.body for r in sentry.requests).decode()
    assert all(r.path == "/api/1/envelope/" for r in sentry.requests)
    for secret in SECRETS:
        assert secret not in raw, f"{secret!r} leaked to Sentry"
    job_event = next(i["payload"] for i in items if i["type"] == "event" and i["payload"].get("exception"))
    assert job_event["environment"] == "staging"
    assert job_event["tags"]["request_id"] == message.options["request_id"]
    assert job_event["tags"]["job"] == "leaky_job"
    assert job_event["tags"]["process_kind"] == "worker"
    assert "data" not in job_event["contexts"].get("dramatiq", {})
    assert "[redacted]" in job_event["exception"]["values"][0]["value"]
    frames = job_event["exception"]["values"][0]["stacktrace"]["frames"]
    assert all("vars" not in f for f in frames)
    # Staging samples every trace (seed 000 §7.2): the job's transaction arrived too.
    assert any(i["type"] == "transaction" for i in items)


def test_traces_sample_rates_per_environment():
    from worker.sentry import TRACES_SAMPLE_RATE

    assert TRACES_SAMPLE_RATE["staging"] == 1.0
    assert TRACES_SAMPLE_RATE["production"] == 0.1


def test_job_families_are_traced_at_their_share_and_errors_are_never_sampled(sentry, worker, broker):
    from sentry_sdk.integrations.redis import RedisIntegration

    from worker.sentry import traces_rate

    def rate(name: str | None, parent: bool | None = None, env_rate: float = 0.1) -> float:
        return traces_rate({"transaction_context": {"name": name}, "parent_sampled": parent}, env_rate)

    # Production (10 %): the high-volume families at a tenth of it, whatever their enqueuer sampled.
    for job in ("kyc.sumsub_webhook", "aisp.refresh_account", "aisp.refresh_batch", "pisp.poll_status"):
        assert rate(job, parent=True) == pytest.approx(0.01), job
    assert rate("sca.expire_timeouts") == pytest.approx(0.1)
    assert rate("kyc.aml_check", env_rate=1.0) == 1.0
    assert rate("not-a-job", parent=True) == 1.0 and rate("not-a-job") == pytest.approx(0.1)
    # Workers: Sentry's Redis integration (a wrapper around every Redis command) is off.
    assert sentry_sdk.get_client().get_integration(RedisIntegration) is None

    untraced_failing_job.send()
    wait_for(lambda: any(i["type"] == "event" and i["payload"].get("exception") for i in events(sentry)),
             what="the error event of a job traced at 0 %")
    items = events(sentry)
    error = next(i["payload"] for i in items if i["type"] == "event" and i["payload"].get("exception"))
    assert error["tags"]["job"] == "untraced_failing_job"
    assert not any(i["type"] == "transaction" for i in items)
    crumbs = [c.get("message") for c in (error.get("breadcrumbs") or {}).get("values", [])]
    assert "a warning: a breadcrumb" in crumbs and "a routine line: no breadcrumb" not in crumbs


def test_breaker_open_more_than_five_minutes_is_a_sentry_high_event(sentry, db, slack):
    from monitoring.rules import Evaluator, breakers
    from worker.alerts import _keys
    from worker.breaker import get_breaker
    from worker.redis_client import get_redis

    get_breaker("neonomics_pisp").open()
    ev = Evaluator(rules=(breakers,))
    ev.evaluate()
    active = _keys("breaker-open:neonomics_pisp")[0]
    marker = json.loads(get_redis().get(active))
    marker["since"] = time.time() - 360  # as if opened six minutes ago
    get_redis().set(active, json.dumps(marker))
    ev.evaluate()
    ev.evaluate()  # once per incident
    highs = [i["payload"] for i in events(sentry)
             if i["type"] == "event" and i["payload"].get("tags", {}).get("severity") == "high"]
    assert len(highs) == 1
    assert highs[0]["level"] == "error"
    assert "neonomics_pisp open for 6 min" in highs[0]["message"]


def test_critical_alert_goes_to_sentry_scrubbed(sentry, slack):
    from worker.alerts import send_alert

    send_alert("critical", "Late payment success", f"payment for {EMAIL} succeeded after SCA timeout",
               key="late-success")
    crits = [i["payload"] for i in events(sentry) if i["type"] == "event"]
    assert crits and crits[0]["level"] == "fatal"
    assert EMAIL not in json.dumps(crits)
