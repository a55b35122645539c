"""Neonomics client against the sandbox over real HTTP: tokens, every error class, retries."""

import threading
import time

import pytest

from worker.breaker import get_breaker
from worker.context import request_id_var
from worker.providers import get_neonomics
from worker.providers.errors import (
    AccessExceededError,
    AuthenticationError,
    CircuitOpenError,
    ClientError,
    ConflictError,
    ConsentError,
    MalformedResponseError,
    NotFoundError,
    ProviderConnectionError,
    ProviderTimeout,
    ServerError,
    UnexpectedStatusError,
)
from worker.providers.neonomics import NeonomicsClient
from worker.retry import should_retry
from worker.settings import get_settings


def client(sandbox, **kw) -> NeonomicsClient:
    s = get_settings()
    return NeonomicsClient(sandbox.url, s.neonomics_client_id, s.neonomics_client_secret.get_secret_value(), **kw)


def _pay(nc, key="idem-1", amount=201_000):
    return nc.initiate_payment(
        idempotency_key=key, consent_id="pis-consent", amount_ore=amount, currency="NOK",
        debtor_account={"iban": "NO9386011117947"}, creditor_name="Test Creditor",
        creditor_account={"bban": "26512345678"}, remittance="Drop remittance tx_1",
    )


# --- balances and tokens ---------------------------------------------------------------------


def test_balances_prefers_expected_in_ore_and_caches_the_token(sandbox):
    sandbox.set_account("acc-1", amount="45230.07", consent_id="consent-1")
    nc = get_neonomics()
    for _ in range(3):
        balances = nc.get_balances("acc-1", "consent-1")
    best = balances.preferred()
    assert (best.balance_type, best.amount_ore, best.currency) == ("expected", 4_523_007, "NOK")
    assert sandbox.count("neonomics.token") == 1
    reads = sandbox.requests("neonomics.balances")
    assert len(reads) == 3
    assert all(r["x_consent_id"] == "consent-1" and not r["psu_ip_address"] for r in reads)


def test_psu_ip_only_for_user_initiated_reads(sandbox):
    nc = get_neonomics()
    nc.get_balances("acc-1", "c")
    nc.get_balances("acc-1", "c", psu_ip="10.0.0.7")
    assert [r["psu_ip_address"] for r in sandbox.requests("neonomics.balances")] == [False, True]


def test_token_refreshed_once_after_401(sandbox):
    nc = get_neonomics()
    nc.get_balances("acc-1", "c")
    assert sandbox.revoke_tokens() == 1
    nc.get_balances("acc-1", "c")
    assert sandbox.count("neonomics.token") == 2
    assert [r["status"] for r in sandbox.requests("neonomics.balances")] == [200, 401, 200]


def test_second_401_is_an_authentication_error_not_a_loop(sandbox):
    nc = get_neonomics()
    sandbox.fault("neonomics.balances", status=401, code="TOKEN_INVALID", count=5)
    with pytest.raises(AuthenticationError) as info:
        nc.get_balances("acc-1", "c")
    assert info.value.status == 401
    assert sandbox.count("neonomics.token") == 2  # initial + exactly one refresh
    assert sandbox.count("neonomics.balances") == 2
    assert not should_retry(0, info.value)


def test_token_refetched_shortly_before_expiry(sandbox):
    sandbox.config(token_ttl_s=1.0)  # refresh margin is a tenth of that
    nc = get_neonomics()
    nc.get_balances("acc-1", "c")
    nc.get_balances("acc-1", "c")
    assert sandbox.count("neonomics.token") == 1
    time.sleep(0.95)
    nc.get_balances("acc-1", "c")
    assert sandbox.count("neonomics.token") == 2
    assert sandbox.count("neonomics.balances") == 3  # no 401 needed: refreshed proactively


def test_threads_share_one_token(sandbox):
    sandbox.fault("neonomics.token", latency_ms=200)
    nc = get_neonomics()
    errors = []

    def read():
        try:
            nc.get_balances("acc-1", "c")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sandbox.count("neonomics.token") == 1
    assert sandbox.count("neonomics.balances") == 8


def test_missing_credentials_fail_clearly(sandbox):
    nc = NeonomicsClient(sandbox.url, "", "")
    with pytest.raises(AuthenticationError, match="NEONOMICS_CLIENT_ID"):
        nc.get_balances("acc-1", "c")
    assert sandbox.count() == 0


def test_wrong_client_secret_is_refused(sandbox):
    nc = NeonomicsClient(sandbox.url, get_settings().neonomics_client_id, "wrong")
    with pytest.raises(AuthenticationError) as info:
        nc.get_balances("acc-1", "c")
    assert info.value.operation == "token"


# --- error classes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status"), [("CONSENT_EXPIRED", 403), ("CONSENT_INVALID", 401)])
def test_consent_errors(sandbox, code, status):
    sandbox.expire_consent("acc-9", code=code)
    nc = get_neonomics()
    with pytest.raises(ConsentError) as info:
        nc.get_balances("acc-9", "c")
    assert (info.value.code, info.value.status) == (code, status)
    assert not should_retry(0, info.value)
    assert sandbox.count("neonomics.token") == 1  # a consent 401 is not a token problem


def test_consent_unknown(sandbox):
    sandbox.set_account("acc-2", consent_id="right")
    with pytest.raises(ConsentError) as info:
        get_neonomics().get_balances("acc-2", "wrong")
    assert info.value.code == "CONSENT_UNKNOWN"


def test_access_exceeded_honours_retry_after(sandbox):
    sandbox.fault("neonomics.balances", status=429, retry_after=7, count=1)
    with pytest.raises(AccessExceededError) as info:
        get_neonomics().get_balances("acc-1", "c")
    assert info.value.retry_after_s == 7.0
    assert info.value.code == "ACCESS_EXCEEDED"
    assert not should_retry(0, info.value)


@pytest.mark.parametrize(
    ("status", "error", "transient"),
    [(500, ServerError, True), (502, ServerError, True), (503, ServerError, True), (504, ProviderTimeout, True),
     (400, ClientError, False), (409, ConflictError, False), (501, UnexpectedStatusError, False)],
)
def test_status_classes(sandbox, status, error, transient):
    sandbox.fault("neonomics.status", status=status, count=1)
    with pytest.raises(error) as info:
        get_neonomics().get_payment_status("pay_x")
    assert info.value.status == status
    assert should_retry(0, info.value) is transient
    assert "sandbox fault" not in str(info.value)  # messages carry codes, never body text


def test_not_found(sandbox):
    with pytest.raises(NotFoundError):
        get_neonomics().get_payment_status("pay_unknown")


def test_timeout_is_transient_and_bounded(sandbox):
    sandbox.fault("neonomics.status", timeout=True, hang_s=5, count=1)
    nc = client(sandbox, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderTimeout) as info:
        nc.get_payment_status("pay_x")
    assert time.monotonic() - started < 2.0
    assert should_retry(0, info.value)


def test_connection_errors(sandbox):
    with pytest.raises(ProviderConnectionError):
        NeonomicsClient("http://127.0.0.1:9", "id", "secret", timeout=1).get_payment_status("pay_x")
    sandbox.fault("neonomics.status", disconnect=True, count=1)
    with pytest.raises(ProviderConnectionError) as info:
        get_neonomics().get_payment_status("pay_x")
    assert should_retry(0, info.value)


@pytest.mark.parametrize(
    "raw",
    [
        [{"balanceType": "expected", "balanceAmount": {"currency": "NOK", "amount": 45230.0}}],  # a float
        [{"balanceType": "expected", "balanceAmount": {"currency": "NOK", "amount": "1e3"}}],
        [{"balanceType": "expected", "balanceAmount": {"currency": "NOK", "amount": "NaN"}}],
        [{"balanceType": "expected", "balanceAmount": {"currency": "NOK", "amount": "1.234"}}],
        [{"balanceType": "expected", "balanceAmount": {"currency": "NOK", "amount": "9" * 30}}],
        [{"balanceType": "expected", "balanceAmount": {"currency": 578, "amount": "1.00"}}],
        [{"balanceType": "expected"}],
        [],
        "not a list",
    ],
)
def test_malformed_balances_are_a_typed_error(sandbox, raw):
    sandbox.set_account("acc-m", raw_balances=raw)
    with pytest.raises(MalformedResponseError) as info:
        get_neonomics().get_balances("acc-m", "c")
    assert not should_retry(0, info.value)


# --- retries (one policy: worker.retry) ------------------------------------------------------


def test_in_process_retries_follow_the_backoff(sandbox, monkeypatch):
    monkeypatch.setenv("DROP_BREAKER_FAIL_MAX", "10")
    get_settings.cache_clear()
    sleeps: list[float] = []
    sandbox.fault("neonomics.balances", status=503, count=2)
    nc = client(sandbox, retries=3, sleep=sleeps.append)
    assert nc.get_balances("acc-1", "c").preferred().amount_ore == 4_523_000
    assert sandbox.count("neonomics.balances") == 3
    assert len(sleeps) == 2
    assert 1.0 <= sleeps[0] <= 1.5 and 2.0 <= sleeps[1] <= 3.0


def test_retries_exhausted_after_three(sandbox, monkeypatch):
    monkeypatch.setenv("DROP_BREAKER_FAIL_MAX", "10")
    get_settings.cache_clear()
    sleeps: list[float] = []
    sandbox.fault("neonomics.balances", status=502)
    with pytest.raises(ServerError):
        client(sandbox, retries=3, sleep=sleeps.append).get_balances("acc-1", "c")
    assert sandbox.count("neonomics.balances") == 4
    assert len(sleeps) == 3  # base 1 s doubling, up to 50 % jitter each
    assert 1.0 <= sleeps[0] <= 1.5 and 2.0 <= sleeps[1] <= 3.0 and 4.0 <= sleeps[2] <= 6.0


def test_real_backoff_timing(sandbox):
    sandbox.fault("neonomics.status", status=500, count=1)
    nc = client(sandbox, retries=3)
    pay = _pay(nc)
    started = time.monotonic()
    assert nc.get_payment_status(pay.payment_id).transaction_status == "ACTC"
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0  # one backoff of 1 s + up to 50 % jitter
    assert sandbox.count("neonomics.status") == 2


def test_4xx_is_never_retried(sandbox):
    sleeps: list[float] = []
    sandbox.fault("neonomics.balances", status=400)
    with pytest.raises(ClientError):
        client(sandbox, retries=3, sleep=sleeps.append).get_balances("acc-1", "c")
    assert sandbox.count("neonomics.balances") == 1 and sleeps == []


def test_retries_stop_when_the_breaker_opens(sandbox):
    sleeps: list[float] = []
    sandbox.fault("neonomics.balances", status=503)
    with pytest.raises(CircuitOpenError):
        client(sandbox, retries=3, sleep=sleeps.append).get_balances("acc-1", "c")
    assert sandbox.count("neonomics.balances") == 3  # the 3rd failure opened the circuit
    assert len(sleeps) == 3


# --- PISP ------------------------------------------------------------------------------------


def test_initiation_uses_the_idempotency_key_and_is_idempotent(sandbox, monkeypatch):
    nc = client(sandbox, retries=1, sleep=lambda s: None)
    sandbox.fault("neonomics.initiate", status=503, count=1)
    first = nc.initiate_payment(
        idempotency_key="tx-idem-77", consent_id="pis", amount_ore=201_000, currency="NOK",
        debtor_account={"iban": "NO9386011117947"}, creditor_name="X", creditor_account={"bban": "26512345678"},
    )
    again = _pay(nc, key="tx-idem-77")
    assert first.payment_id == again.payment_id
    assert first.transaction_status == "RCVD"
    assert first.sca_redirect.endswith(f"/sca/{first.payment_id}")
    assert {r["x_request_id"] for r in sandbox.requests("neonomics.initiate")} == {"tx-idem-77"}
    assert sandbox.payment(first.payment_id)["amount"] == "2010.00"


def test_status_progression_and_request_id(sandbox):
    nc = get_neonomics()
    pay = _pay(nc)
    token = request_id_var.set("poll-job-1")
    try:
        seen = [nc.get_payment_status(pay.payment_id).transaction_status for _ in range(4)]
    finally:
        request_id_var.reset(token)
    assert seen == ["ACTC", "ACCP", "ACSC", "ACSC"]
    assert {r["x_request_id"] for r in sandbox.requests("neonomics.status")} == {"poll-job-1"}


def test_cancel(sandbox):
    nc = get_neonomics()
    pay = _pay(nc)
    result = nc.cancel_payment(pay.payment_id)
    assert result.transaction_status is None and not result.needs_authorisation
    assert nc.get_payment_status(pay.payment_id).transaction_status == "CANC"
    with pytest.raises(ClientError) as info:
        nc.cancel_payment(pay.payment_id)
    assert info.value.code == "CANCELLATION_INVALID"
    with pytest.raises(NotFoundError):
        nc.cancel_payment("pay_nope")


def test_ids_cannot_change_the_path(sandbox):
    with pytest.raises(ValueError):
        get_neonomics().get_payment_status("../accounts/x")


def test_aisp_failures_do_not_open_pisp(sandbox):
    sandbox.fault("neonomics.balances", status=503)
    nc = get_neonomics()
    for _ in range(3):
        with pytest.raises(ServerError):
            nc.get_balances("acc-1", "c")
    with pytest.raises(CircuitOpenError):
        nc.get_balances("acc-1", "c")
    assert get_breaker("neonomics_aisp").current_state == "open"
    assert get_breaker("neonomics_pisp").current_state == "closed"
    assert _pay(nc).transaction_status == "RCVD"
