"""Neonomics (Berlin Group NextGenPSD2) client: AISP balance reads and PISP payments.

Seed 000 §3.2–3.3. OAuth2 client-credentials token from `/auth/token`, cached per client
object (shared by its threads) until shortly before `expires_in`, refreshed once on a 401
that is not a consent error. AISP calls go through breaker `neonomics_aisp`, PISP calls
through `neonomics_pisp`; each attempt (token fetch included) counts once for its breaker.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from worker.breaker import NEONOMICS_AISP, NEONOMICS_PISP, get_breaker
from worker.http import REQUEST_ID_HEADER, fast_async_transport, make_async_client, make_client
from worker.money import AmountError, format_amount, parse_amount
from worker.providers.base import ProviderAnswers, ProviderClient
from worker.providers.errors import (
    AuthenticationError,
    CircuitOpenError,
    ConsentError,
    ProviderError,
    error_for_response,
    error_for_transport,
)
from worker.settings import get_settings

T = TypeVar("T")

# Balance types in order of preference (docs/aisp.md: prefer `expected`).
BALANCE_PREFERENCE = ("expected", "interimAvailable", "closingBooked", "interimBooked", "openingBooked")
TOKEN_REFRESH_MARGIN_S = 60.0
# Connections of one loop's async client: the in-flight reads of a worker process share them.
ASYNC_MAX_CONNECTIONS = 128
ASYNC_CONNECTIONS_PER_SHARD = 4


@dataclass(frozen=True)
class NeonomicsPaths:
    """Endpoint templates (configurable; defaults: docs/providers.md)."""

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


class NeonomicsAnswers(ProviderAnswers):
    """Neonomics' token and balance answers, validated the same way by both clients."""

    provider = "neonomics"

    def _token_from(self, response: httpx.Response, fetched_so_far: int) -> _Token:
        """Validate a token answer (shared by the sync and async clients)."""
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

    def _payment_status(self, payment_id: str, response: httpx.Response) -> PaymentStatus:
        status = self._json(response, "status").get("transactionStatus")
        if not isinstance(status, str) or not status.isalnum() or len(status) > 8:
            raise self._malformed("status", "transactionStatus missing or not a code", response.status_code)
        return PaymentStatus(payment_id, status)


class NeonomicsClient(NeonomicsAnswers, ProviderClient):
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
        return self._token_from(response, fetched_so_far)

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
            raw_links = data.get("_links")
            links: dict[str, Any] = raw_links if isinstance(raw_links, dict) else {}
            raw_sca = links.get("scaRedirect")
            sca: dict[str, Any] = raw_sca if isinstance(raw_sca, dict) else {}
            href = sca.get("href") if isinstance(sca.get("href"), str) else None
            return PaymentInitiation(payment_id, status, href)

        return self._guarded(get_breaker(NEONOMICS_PISP), attempt)

    def get_payment_status(self, payment_id: str) -> PaymentStatus:
        """The Berlin Group transactionStatus (RCVD, ACTC, ACCP, ACSC, RJCT, CANC, …)."""
        path = self.paths.status.format(payment_id=_segment(payment_id))

        def attempt() -> PaymentStatus:
            return self._payment_status(payment_id, self._authorized("status", "GET", path, headers={}))

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


class AsyncNeonomicsClient(NeonomicsAnswers):
    """The async twin of `NeonomicsClient` for AsyncIO actors (AISP balance reads).

    One instance per event loop (`get_async_neonomics()`): its httpx.AsyncClient pools and one
    cached token are shared by every coroutine of the loop, so in-flight reads cost sockets,
    not threads. Parsing (`NeonomicsAnswers`, the base both share), error mapping, metrics and
    the breaker are the sync client's, so both clients answer identically.
    """

    provider = "neonomics"

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        http: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        paths: NeonomicsPaths | None = None,
        max_connections: int = ASYNC_MAX_CONNECTIONS,
    ) -> None:
        if http is not None:
            self._shards = [http]
        else:
            # worker.http's factory (timeouts, headers, X-Request-ID), its connections split over a
            # few small pools: httpcore scans every connection of a pool for each request it
            # assigns and each response it closes, so one pool of N connections costs O(N) per
            # request (most of the CPU of a read at 1000 reads/s); shards of 4 keep that constant.
            per_shard = min(max_connections, ASYNC_CONNECTIONS_PER_SHARD)
            limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard,
                                  keepalive_expiry=30)
            self._shards = [
                make_async_client(base_url, timeout=timeout, transport=fast_async_transport(limits))
                for _ in range(max(1, max_connections // per_shard))
            ]
        self._inflight = [0] * len(self._shards)
        self._client_id = client_id
        self._client_secret = client_secret
        self.paths = paths or NeonomicsPaths()
        self._token = _Token()
        self._token_lock: asyncio.Lock | None = None  # created on the loop that uses it

    @property
    def http(self) -> httpx.AsyncClient:
        return self._shards[0]

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()

    @property
    def tokens_fetched(self) -> int:
        return self._token.fetched

    async def access_token(self) -> str:
        """A valid token (cached, or fetched now): lets a caller fail before it reserves anything."""
        return await self._access_token()

    async def _access_token(self, *, stale: str | None = None) -> str:
        token = self._token
        if token.value and time.monotonic() < token.expires_at and token.value != stale:
            return token.value  # the hot path takes no lock
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:  # one fetch for all coroutines waiting on an expired token
            token = self._token
            if token.value and time.monotonic() < token.expires_at and token.value != stale:
                return token.value
            if not self._client_id or not self._client_secret:
                raise AuthenticationError(
                    "NEONOMICS_CLIENT_ID / NEONOMICS_CLIENT_SECRET not configured",
                    provider=self.provider, operation="token",
                )
            response = await self._send(
                "token", "POST", self.paths.token,
                data={"grant_type": "client_credentials", "client_id": self._client_id,
                      "client_secret": self._client_secret},
            )
            self._token = self._token_from(response, token.fetched)
            return self._token.value

    async def _send(self, operation: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP attempt; a 2xx response or a typed ProviderError (same metrics as sync)."""
        with self._attempt(operation):
            # The least busy pool (they share the token, settings and breaker).
            shard = min(range(len(self._shards)), key=self._inflight.__getitem__)
            self._inflight[shard] += 1
            try:
                response = await self._shards[shard].request(method, path, **kwargs)
            finally:
                self._inflight[shard] -= 1
            return self._checked(response, operation)

    async def _authorized(self, operation: str, method: str, path: str, *, headers: dict[str, str],
                          **kwargs: Any) -> httpx.Response:
        token = await self._access_token()
        for refreshed in (False, True):
            try:
                return await self._send(operation, method, path,
                                        headers={**headers, "Authorization": f"Bearer {token}"}, **kwargs)
            except AuthenticationError as exc:
                if exc.status != 401 or refreshed:
                    raise
                token = await self._access_token(stale=token)
        raise AssertionError("unreachable")

    @staticmethod
    def admit_many(breaker_name: str = NEONOMICS_AISP) -> bool:
        """One breaker admission for requests about to be sent together (a batch of reads).

        True: the breaker (`neonomics_aisp` for balances, `neonomics_pisp` for payment statuses)
        is closed; pass `admitted=True` to `get_balances` / `get_payment_status` for each of them
        (one Redis round trip instead of one per request; each request's failure still counts).
        False: open or half-open — the caller sends each request unadmitted, so the breaker
        refuses them or grants its single trial as usual."""
        breaker = get_breaker(breaker_name)
        try:
            token = breaker._admit()
        except CircuitOpenError:
            return False
        if token is not None:  # we won the half-open trial ticket: give it back for one request
            breaker._release(token)
            return False
        return True

    async def get_balances(self, account_id: str, consent_id: str, *, psu_ip: str | None = None,
                           request_id: str | None = None, admitted: bool = False) -> Balances:
        """GET balances, one attempt through breaker `neonomics_aisp` (no in-process retries:
        every AISP request counts against PSD2's quota, so the caller decides about retries).
        `request_id` becomes X-Request-ID (the quota ledger records it). `admitted`: the caller
        got `admit_many()` for this request (closed breaker); its outcome is still reported."""
        headers = {"X-Consent-ID": consent_id, "Content-Type": "application/json"}
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        if psu_ip:
            headers["PSU-IP-Address"] = psu_ip
        path = self.paths.balances.format(account_id=_segment(account_id))

        async def attempt() -> Balances:
            response = await self._authorized("balances", "GET", path, headers=headers)
            return self._parse_balances(account_id, self._json(response, "balances"))

        return await self._through(NEONOMICS_AISP, attempt, admitted)

    async def get_payment_status(self, payment_id: str, *, request_id: str | None = None,
                                 admitted: bool = False) -> PaymentStatus:
        """The Berlin Group transactionStatus, one attempt through breaker `neonomics_pisp`
        (the sync client's answer and errors; retries are the caller's: Dramatiq's policy).
        `request_id` becomes X-Request-ID (the poll's own, also in its audit row)."""
        path = self.paths.status.format(payment_id=_segment(payment_id))
        headers = {REQUEST_ID_HEADER: request_id} if request_id else {}

        async def attempt() -> PaymentStatus:
            return self._payment_status(payment_id, await self._authorized("status", "GET", path, headers=headers))

        return await self._through(NEONOMICS_PISP, attempt, admitted)

    @staticmethod
    async def _through(breaker_name: str, attempt: Callable[[], Awaitable[T]], admitted: bool) -> T:
        """One attempt through the breaker, or, `admitted` by `admit_many()`, with only its
        outcome reported (a failure counts as it would after a single admission)."""
        breaker = get_breaker(breaker_name)
        if not admitted:
            return await breaker.call_async(attempt)
        try:
            result = await attempt()
        except BaseException as exc:
            breaker._outcome(None, exc)
            raise
        return result  # a closed-state success changes nothing (breaker._on_success)


# One async client per (process, event loop, configuration): an httpx.AsyncClient belongs to
# the loop it first ran on. Dramatiq's AsyncIO middleware runs one loop per worker process.
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, AsyncNeonomicsClient]] = (
    weakref.WeakKeyDictionary()
)
_async_lock = threading.Lock()


def get_async_neonomics() -> AsyncNeonomicsClient:
    """The running event loop's Neonomics client, configured from settings (call inside a coroutine)."""

    loop = asyncio.get_running_loop()
    s = get_settings()
    secret = s.neonomics_client_secret.get_secret_value() if s.neonomics_client_secret else ""
    cache_key = (os.getpid(), s.neonomics_api_url, s.neonomics_client_id, secret, s.provider_timeout_s)
    with _async_lock:
        per_loop = _async_clients.setdefault(loop, {})
        client = per_loop.get(cache_key)
        if client is None:
            client = AsyncNeonomicsClient(
                s.neonomics_api_url, s.neonomics_client_id or "", secret, timeout=s.provider_timeout_s
            )
            per_loop[cache_key] = client
        return client


def forget_async_clients() -> None:
    """Drop every loop's cached clients (tests: a sandbox reset invalidates their tokens)."""
    with _async_lock:
        _async_clients.clear()


async def close_async_neonomics() -> None:
    """Close the running loop's clients (tests, shutdown)."""
    with _async_lock:
        clients = list(_async_clients.pop(asyncio.get_running_loop(), {}).values())
    for client in clients:
        await client.aclose()


def _segment(value: str) -> str:
    """A path segment: refuse anything that could change the path."""
    if not value or any(c in value for c in "/?#%\\") or value in (".", ".."):
        raise ValueError("not a valid provider id")
    return value


# Re-exported for callers that only import this module.
__all__ = [
    "AsyncNeonomicsClient",
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
    "get_async_neonomics",
]
