"""Neonomics (Berlin Group NextGenPSD2) client: AISP balance reads and PISP payments.

Seed 000 §3.2–3.3. OAuth2 client-credentials token from `/auth/token`, cached per client
object (shared by its threads) until shortly before `expires_in`, refreshed once on a 401
that is not a consent error. AISP calls go through breaker `neonomics_aisp`, PISP calls
through `neonomics_pisp`; each attempt (token fetch included) counts once for its breaker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from worker.breaker import NEONOMICS_AISP, NEONOMICS_PISP, get_breaker
from worker.http import REQUEST_ID_HEADER, make_client
from worker.money import AmountError, format_amount, parse_amount
from worker.providers.base import ProviderClient
from worker.providers.errors import (
    AuthenticationError,
    ConsentError,
    ProviderError,
    error_for_response,
    error_for_transport,
)

# Balance types in order of preference (DESIGN.md: prefer `expected`).
BALANCE_PREFERENCE = ("expected", "interimAvailable", "closingBooked", "interimBooked", "openingBooked")
TOKEN_REFRESH_MARGIN_S = 60.0


@dataclass(frozen=True)
class NeonomicsPaths:
    """Endpoint templates (configurable; defaults are seed 000's)."""

    token: str = "/auth/token"  # noqa: S105 - a path, not a password
    balances: str = "/v1/accounts/{account_id}/balances"
    initiate: str = "/v1/payments/sepa-credit-transfers"
    status: str = "/v1/payments/{payment_id}/status"
    cancel: str = "/v1/payments/sepa-credit-transfers/{payment_id}"


@dataclass(frozen=True)
class Balance:
    balance_type: str
    amount_ore: int
    currency: str
    last_change: str | None = None


@dataclass(frozen=True)
class Balances:
    account_id: str
    balances: tuple[Balance, ...]

    def preferred(self) -> Balance:
        """`expected` if present, then interimAvailable, closingBooked, …, else the first."""
        by_type = {b.balance_type: b for b in self.balances}
        for balance_type in BALANCE_PREFERENCE:
            if balance_type in by_type:
                return by_type[balance_type]
        return self.balances[0]


@dataclass(frozen=True)
class PaymentInitiation:
    payment_id: str
    transaction_status: str
    sca_redirect: str | None


@dataclass(frozen=True)
class PaymentStatus:
    payment_id: str
    transaction_status: str


@dataclass(frozen=True)
class Cancellation:
    payment_id: str
    # None when the provider answered 204 (cancelled, no body).
    transaction_status: str | None
    needs_authorisation: bool = False


@dataclass
class _Token:
    value: str = ""
    expires_at: float = 0.0  # time.monotonic()
    fetched: int = field(default=0)


class NeonomicsClient(ProviderClient):
    provider = "neonomics"

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
        paths: NeonomicsPaths | None = None,
        retries: int = 0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(http or make_client(base_url, timeout=timeout), retries=retries, sleep=sleep)
        self._client_id = client_id
        self._client_secret = client_secret
        self.paths = paths or NeonomicsPaths()
        self._token = _Token()
        self._token_lock = threading.Lock()

    # --- token ---------------------------------------------------------------------------

    @property
    def tokens_fetched(self) -> int:
        return self._token.fetched

    def _access_token(self, *, stale: str | None = None) -> str:
        """The cached token; fetch one if none, nearly expired, or equal to `stale` (a 401)."""
        with self._token_lock:  # one fetch for all threads; held only while fetching a token
            token = self._token
            fresh = token.value and time.monotonic() < token.expires_at
            if fresh and token.value != stale:
                return token.value
            self._token = self._fetch_token(token.fetched)
            return self._token.value

    def _fetch_token(self, fetched_so_far: int) -> _Token:
        if not self._client_id or not self._client_secret:
            raise AuthenticationError(
                "NEONOMICS_CLIENT_ID / NEONOMICS_CLIENT_SECRET not configured",
                provider=self.provider, operation="token",
            )
        response = self._send(
            "token", "POST", self.paths.token,
            data={"grant_type": "client_credentials", "client_id": self._client_id,
                  "client_secret": self._client_secret},
        )
        data = self._json(response, "token")
        value = data.get("access_token")
        expires_in = data.get("expires_in", 300)
        if not isinstance(value, str) or not value:
            raise self._malformed("token", "no access_token", response.status_code)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            raise self._malformed("token", "bad expires_in", response.status_code)
        # Refresh a little before expiry (never more than a tenth of a short lifetime).
        margin = min(TOKEN_REFRESH_MARGIN_S, float(expires_in) / 10)
        return _Token(value, time.monotonic() + float(expires_in) - margin, fetched_so_far + 1)

    def invalidate_token(self) -> None:
        with self._token_lock:
            self._token = _Token(fetched=self._token.fetched)

    # --- one authenticated attempt ---------------------------------------------------------

    def _authorized(self, operation: str, method: str, path: str, *, headers: dict[str, str],
                    **kwargs: Any) -> httpx.Response:
        """Send with the bearer token; on a non-consent 401, refresh the token once and resend."""
        token = self._access_token()
        for refreshed in (False, True):
            try:
                return self._send(operation, method, path,
                                  headers={**headers, "Authorization": f"Bearer {token}"}, **kwargs)
            except AuthenticationError as exc:
                if exc.status != 401 or refreshed:
                    raise
                token = self._access_token(stale=token)
        raise AssertionError("unreachable")

    # --- AISP -----------------------------------------------------------------------------

    def get_balances(self, account_id: str, consent_id: str, *, psu_ip: str | None = None) -> Balances:
        """GET balances. `psu_ip` only for user-initiated reads (PSD2: the user is present)."""
        headers = {"X-Consent-ID": consent_id, "Content-Type": "application/json"}
        if psu_ip:
            headers["PSU-IP-Address"] = psu_ip
        path = self.paths.balances.format(account_id=_segment(account_id))

        def attempt() -> Balances:
            response = self._authorized("balances", "GET", path, headers=headers)
            return self._parse_balances(account_id, self._json(response, "balances"))

        return self._guarded(get_breaker(NEONOMICS_AISP), attempt)

    def _parse_balances(self, account_id: str, data: dict[str, Any]) -> Balances:
        raw = data.get("balances")
        if not isinstance(raw, list) or not raw:
            raise self._malformed("balances", "no balances")
        parsed = []
        for item in raw:
            if not isinstance(item, dict):
                raise self._malformed("balances", "balance is not an object")
            amount = item.get("balanceAmount")
            if not isinstance(amount, dict):
                raise self._malformed("balances", "balanceAmount missing")
            currency = amount.get("currency")
            if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
                raise self._malformed("balances", "bad currency")
            try:
                ore = parse_amount(amount.get("amount"))
            except AmountError as exc:
                raise self._malformed("balances", f"bad amount ({exc})") from None
            balance_type = item.get("balanceType")
            if not isinstance(balance_type, str):
                raise self._malformed("balances", "balanceType missing")
            last = item.get("lastChangeDateTime")
            parsed.append(Balance(balance_type, ore, currency.upper(), last if isinstance(last, str) else None))
        return Balances(account_id, tuple(parsed))

    # --- PISP -----------------------------------------------------------------------------

    def initiate_payment(
        self,
        *,
        idempotency_key: str,
        consent_id: str,
        amount_ore: int,
        currency: str,
        debtor_account: dict[str, str],
        creditor_name: str,
        creditor_account: dict[str, str],
        remittance: str | None = None,
        psu_ip: str | None = None,
    ) -> PaymentInitiation:
        """POST a SEPA credit transfer. X-Request-ID = idempotency_key, so a retry of the same
        transaction can never create a second payment (the provider dedupes on it)."""
        if amount_ore <= 0:
            raise ValueError("amount_ore must be positive")
        body: dict[str, Any] = {
            "debtorAccount": debtor_account,
            "instructedAmount": {"currency": currency, "amount": format_amount(amount_ore)},
            "creditorName": creditor_name,
            "creditorAccount": creditor_account,
        }
        if remittance:
            body["remittanceInformationUnstructured"] = remittance
        headers = {REQUEST_ID_HEADER: idempotency_key, "X-Consent-ID": consent_id}
        if psu_ip:
            headers["PSU-IP-Address"] = psu_ip

        def attempt() -> PaymentInitiation:
            response = self._authorized("initiate", "POST", self.paths.initiate, headers=headers, json=body)
            data = self._json(response, "initiate")
            payment_id, status = data.get("paymentId"), data.get("transactionStatus")
            if not isinstance(payment_id, str) or not payment_id or not isinstance(status, str):
                raise self._malformed("initiate", "paymentId/transactionStatus missing", response.status_code)
            links = data.get("_links") if isinstance(data.get("_links"), dict) else {}
            sca = links.get("scaRedirect") if isinstance(links.get("scaRedirect"), dict) else {}
            href = sca.get("href") if isinstance(sca.get("href"), str) else None
            return PaymentInitiation(payment_id, status, href)

        return self._guarded(get_breaker(NEONOMICS_PISP), attempt)

    def get_payment_status(self, payment_id: str) -> PaymentStatus:
        """The Berlin Group transactionStatus (RCVD, ACTC, ACCP, ACSC, RJCT, CANC, …)."""
        path = self.paths.status.format(payment_id=_segment(payment_id))

        def attempt() -> PaymentStatus:
            response = self._authorized("status", "GET", path, headers={})
            status = self._json(response, "status").get("transactionStatus")
            if not isinstance(status, str) or not status.isalnum() or len(status) > 8:
                raise self._malformed("status", "transactionStatus missing or not a code", response.status_code)
            return PaymentStatus(payment_id, status)

        return self._guarded(get_breaker(NEONOMICS_PISP), attempt)

    def cancel_payment(self, payment_id: str) -> Cancellation:
        """DELETE the payment. 204 → cancelled; 202 → the bank wants the user to authorise
        the cancellation (status says where it is). 404 → NotFoundError; a payment that can no
        longer be cancelled → ClientError (typically 400/405 CANCELLATION_INVALID)."""
        path = self.paths.cancel.format(payment_id=_segment(payment_id))

        def attempt() -> Cancellation:
            response = self._authorized("cancel", "DELETE", path, headers={})
            if response.status_code == 204 or not response.content:
                return Cancellation(payment_id, None)
            data = self._json(response, "cancel")
            status = data.get("transactionStatus")
            return Cancellation(payment_id, status if isinstance(status, str) else None,
                                needs_authorisation=response.status_code == 202 and status != "CANC")

        return self._guarded(get_breaker(NEONOMICS_PISP), attempt)


def _segment(value: str) -> str:
    """A path segment: refuse anything that could change the path."""
    if not value or any(c in value for c in "/?#%\\") or value in (".", ".."):
        raise ValueError("not a valid provider id")
    return value


# Re-exported for callers that only import this module.
__all__ = [
    "Balance",
    "Balances",
    "Cancellation",
    "ConsentError",
    "NeonomicsClient",
    "NeonomicsPaths",
    "PaymentInitiation",
    "PaymentStatus",
    "ProviderError",
    "error_for_response",
    "error_for_transport",
]
