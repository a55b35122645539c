"""Sumsub client against the sandbox: signed requests, status, applicant reuse, 100/min limit."""

import time

import pytest

from worker.providers import get_sumsub
from worker.providers.errors import (
    AuthenticationError,
    NotFoundError,
    RateLimitedError,
    ServerError,
)
from worker.providers.sumsub import SumsubClient
from worker.retry import should_retry
from worker.settings import get_settings


def client(sandbox, **kw) -> SumsubClient:
    s = get_settings()
    return SumsubClient(sandbox.url, s.sumsub_app_token.get_secret_value(),
                        s.sumsub_secret_key.get_secret_value().encode(), **kw)


def test_create_then_status_through_review(sandbox):
    sc = get_sumsub()
    applicant = sc.create_applicant("usr_1", "basic-kyc-level")
    assert applicant.created and applicant.external_user_id == "usr_1"
    status = sc.get_applicant_status(applicant.applicant_id)
    assert (status.review_status, status.review_answer) == ("init", None)
    sandbox.review(applicant.applicant_id, "RED", reject_type="RETRY")
    status = sc.get_applicant_status(applicant.applicant_id)
    assert status.review_status == "completed"
    assert (status.review_answer, status.reject_type, status.reject_labels) == (
        "RED", "RETRY", ("DOCUMENT_UNREADABLE",))


def test_existing_applicant_is_reused(sandbox):
    first = sandbox.create_applicant("usr_2")
    again = get_sumsub().create_applicant("usr_2", "basic-kyc-level")
    assert (again.applicant_id, again.created) == (first["id"], False)
    assert [r["status"] for r in sandbox.requests("sumsub.*")] == [409, 200]


def test_every_request_is_signed_and_the_sandbox_checks_it(sandbox):
    get_sumsub().create_applicant("usr_3", "level with space")  # query string is part of the signature
    assert sandbox.requests("sumsub.create_applicant")[0]["status"] == 201
    s = get_settings()
    forged = SumsubClient(sandbox.url, s.sumsub_app_token.get_secret_value(), b"not-the-secret")
    with pytest.raises(AuthenticationError) as info:
        forged.get_applicant_status("abc")
    assert info.value.status == 401 and not should_retry(0, info.value)


def test_unknown_applicant_and_server_errors(sandbox):
    with pytest.raises(NotFoundError):
        get_sumsub().get_applicant_status("nope")
    sandbox.fault("sumsub.status", status=503, count=1)
    with pytest.raises(ServerError):
        get_sumsub().get_applicant_status("nope")


def test_rate_limit_is_shared_and_never_exceeded(sandbox):
    applicant = sandbox.create_applicant("usr_4")["id"]
    a = client(sandbox, rate_limit=3, max_rate_wait_s=0)
    b = client(sandbox, rate_limit=3, max_rate_wait_s=0)  # another worker, same Redis budget
    a.get_applicant_status(applicant)
    b.get_applicant_status(applicant)
    a.get_applicant_status(applicant)
    with pytest.raises(RateLimitedError) as info:
        b.get_applicant_status(applicant)
    assert should_retry(0, info.value)  # transient: the message is retried later
    assert sandbox.count("sumsub.status") == 3  # the 4th request never left the process


def test_rate_limit_waits_for_a_free_slot(sandbox):
    applicant = sandbox.create_applicant("usr_5")["id"]
    waited: list[float] = []

    def sleep(seconds: float) -> None:
        waited.append(seconds)
        time.sleep(seconds)

    sc = client(sandbox, rate_limit=2, rate_window_s=2, max_rate_wait_s=5, sleep=sleep)
    started = time.monotonic()
    for _ in range(3):
        sc.get_applicant_status(applicant)
    assert waited, "the third request should have waited for the window to slide"
    assert time.monotonic() - started <= 3.0
    assert sandbox.count("sumsub.status") == 3


def test_default_budget_is_100_per_minute():
    assert get_settings().sumsub_rate_limit_per_min == 100


def test_missing_credentials_are_refused_at_construction(sandbox):
    with pytest.raises(AuthenticationError):
        SumsubClient(sandbox.url, "", b"")
