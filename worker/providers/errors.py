"""Typed provider errors: what a job can act on, and what the retry policy reads.

Every error subclasses `worker.retry.TransientError` (worth another attempt: 500/502/503,
timeouts, connection errors, an open circuit) or `worker.retry.PermanentError` (no retry will
fix it: 4xx, a malformed answer). Dramatiq's Retries middleware and `call_with_retries` both
decide with `worker.retry.is_transient`, so there is one policy.

Messages never carry a response body (it may hold names or account numbers): only the
provider, operation, HTTP status and the Berlin Group / Sumsub error *codes*.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Iterable
from typing import Any

import httpx

from worker.retry import PermanentError, TransientError

# Statuses the seed retries (§3.3); 504 is a timeout at the gateway, retried as a timeout.
RETRYABLE_STATUSES = frozenset({500, 502, 503})
CONSENT_CODES = frozenset({"CONSENT_EXPIRED", "CONSENT_INVALID", "CONSENT_UNKNOWN"})


class ProviderError(Exception):
    """Base of every provider failure. `status` is None when no response arrived."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        operation: str,
        status: int | None = None,
        codes: Iterable[str] = (),
    ) -> None:
        self.provider = provider
        self.operation = operation
        self.status = status
        self.codes = tuple(codes)
        detail = f"{provider}.{operation}"
        if status is not None:
            detail += f" HTTP {status}"
        if self.codes:
            detail += f" [{', '.join(self.codes)}]"
        super().__init__(f"{detail}: {message}")

    @property
    def code(self) -> str | None:
        return self.codes[0] if self.codes else None


# --- transient (retried, counted by the circuit breaker) ----------------------------------


class ProviderTransientError(ProviderError, TransientError):
    """Worth another attempt later."""


class ServerError(ProviderTransientError):
    """500/502/503 from the provider."""


class ProviderTimeout(ProviderTransientError):
    """No answer within the attempt timeout (or a 504 from a gateway)."""


class ProviderConnectionError(ProviderTransientError):
    """Could not connect, or the connection broke mid-request."""


class CircuitOpenError(ProviderTransientError):
    """The breaker for this operation is open (or half-open with its trial call in flight).

    No request was sent. Jobs should fall back (cached balance) or re-check later:
    `retry_after_s` is how long until the breaker lets a trial call through.
    """

    def __init__(self, breaker: str, *, retry_after_s: float, half_open: bool = False) -> None:
        self.breaker = breaker
        self.retry_after_s = max(0.0, retry_after_s)
        self.half_open = half_open
        why = "half-open, trial call in flight" if half_open else f"open for {self.retry_after_s:.1f} s more"
        provider, _, operation = breaker.partition("_")
        super().__init__(f"circuit {breaker} {why}", provider=provider, operation=operation or breaker)


class RateLimitedError(ProviderTransientError):
    """Our own client-side limit (Sumsub's 100 requests/min) had no free slot in time."""

    def __init__(self, message: str, *, provider: str, operation: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, provider=provider, operation=operation)


# --- permanent (not retried, not counted by the breaker) -----------------------------------


class ProviderPermanentError(ProviderError, PermanentError):
    """No retry will fix this; record the outcome."""


class ConsentError(ProviderPermanentError):
    """The PSD2 consent is expired, invalid or unknown: clear it and ask the user to re-link."""


class AccessExceededError(ProviderPermanentError):
    """429 (Berlin Group ACCESS_EXCEEDED): stop for this window. `retry_after_s` from Retry-After."""

    def __init__(self, message: str, *, retry_after_s: float | None, **kw) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, **kw)


class NotFoundError(ProviderPermanentError):
    """404: the account, payment or applicant does not exist at the provider."""


class AuthenticationError(ProviderPermanentError):
    """Our credentials or request signature were refused (after one token refresh)."""


class ClientError(ProviderPermanentError):
    """Any other 4xx: the request is wrong; sending it again will not help."""


class ConflictError(ClientError):
    """409: the thing already exists (e.g. a Sumsub applicant for this user)."""


class UnexpectedStatusError(ProviderPermanentError):
    """A status the contract does not know (1xx/3xx, 501, 505…)."""


class MalformedResponseError(ProviderPermanentError):
    """The answer was not what the contract says (bad JSON, missing field, bad amount)."""


# --- classification ------------------------------------------------------------------------


def error_codes(response: httpx.Response) -> list[str]:
    """Berlin Group `tppMessages[].code` and Sumsub `code`/`errorName`; never free text."""
    try:
        data = json.loads(response.content or b"null")
    except ValueError:
        return []
    codes: list[str] = []
    if isinstance(data, dict):
        messages = data.get("tppMessages")
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, dict) and isinstance(message.get("code"), str):
                    codes.append(message["code"][:64])
        for field in ("errorName", "code"):
            value = data.get(field)
            if isinstance(value, str):
                codes.append(value[:64])
    return codes


# A provider's Retry-After is believed up to this long: a 429 pauses an account until the next
# unattended-read slot at most (slots are 6 h apart), never until a date a provider bug names.
MAX_RETRY_AFTER_S = 6 * 3600.0


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), capped at MAX_RETRY_AFTER_S;
    None when absent or unreadable. A date in the past is 0."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value[:12]), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    try:
        delta = when.timestamp() - (time.time() if now is None else now)
    except (OverflowError, OSError, ValueError):
        return None
    return min(max(0.0, delta), MAX_RETRY_AFTER_S)


def error_for_response(response: httpx.Response, *, provider: str, operation: str) -> ProviderError:
    """The typed error for a non-2xx response."""
    status = response.status_code
    codes = error_codes(response)
    kw: dict[str, Any] = {"provider": provider, "operation": operation, "status": status, "codes": codes}
    consent = [c for c in codes if c in CONSENT_CODES]
    if status in (401, 403) and consent:
        return ConsentError("consent is not usable", **{**kw, "codes": consent})
    if status == 429:
        return AccessExceededError(
            "access exceeded", retry_after_s=retry_after_seconds(response.headers.get("Retry-After")), **kw
        )
    if status == 404:
        return NotFoundError("not found", **kw)
    if status in (401, 403):
        return AuthenticationError("credentials or signature refused", **kw)
    if status in RETRYABLE_STATUSES:
        return ServerError("provider server error", **kw)
    if status == 504:
        return ProviderTimeout("gateway timeout", **kw)
    if status == 409:
        return ConflictError("conflict", **kw)
    if 400 <= status < 500:
        return ClientError("request refused", **kw)
    return UnexpectedStatusError("unexpected status", **kw)


def error_for_transport(exc: httpx.TransportError, *, provider: str, operation: str) -> ProviderError:
    """httpx transport failures: timeouts and connection errors (both transient)."""
    kw: dict[str, Any] = {"provider": provider, "operation": operation}
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"no answer in time ({type(exc).__name__})", **kw)
    return ProviderConnectionError(f"connection failed ({type(exc).__name__})", **kw)
