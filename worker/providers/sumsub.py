"""Sumsub client (docs/kyc.md): App-Token request signing, applicant status, webhook digests.

Request signing: `X-App-Access-Sig` = hex HMAC-SHA256(secret key, ts + METHOD + path?query +
body), with `X-App-Token` and `X-App-Access-Ts` (Unix seconds).

Webhook digest: `X-Payload-Digest` = hex HMAC(secret, raw body) with the algorithm named by
`X-Payload-Digest-Alg` (HMAC_SHA1_HEX, HMAC_SHA256_HEX, HMAC_SHA512_HEX; absent → SHA-256).
`check_webhook_digest` / `verify_webhook_digest` are pure functions (no settings, no I/O),
constant-time; an unknown algorithm is a rejection, never a fallback.

Sumsub allows 100 requests/min: every request takes a slot from a Redis sliding-window limiter
(dramatiq.rate_limits.WindowRateLimiter), shared by all workers.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from dramatiq.rate_limits import WindowRateLimiter
from dramatiq.rate_limits.backends import RedisBackend

from worker.breaker import SUMSUB, get_breaker
from worker.http import make_client
from worker.providers.base import ProviderClient
from worker.providers.errors import AuthenticationError, ConflictError, RateLimitedError
from worker.redis_client import get_redis, key

DIGEST_ALGORITHMS: dict[str, Callable[..., Any]] = {
    "HMAC_SHA1_HEX": hashlib.sha1,
    "HMAC_SHA256_HEX": hashlib.sha256,
    "HMAC_SHA512_HEX": hashlib.sha512,
}
DEFAULT_DIGEST_ALG = "HMAC_SHA256_HEX"


# --- webhook digest (pure) ------------------------------------------------------------------


class DigestResult(enum.Enum):
    OK = "ok"
    MISSING_DIGEST = "missing_digest"
    UNKNOWN_ALGORITHM = "unknown_algorithm"
    NO_SECRET = "no_secret"  # noqa: S105 - a result name
    MISMATCH = "mismatch"

    def __bool__(self) -> bool:
        return self is DigestResult.OK


def webhook_digest(secret: bytes, body: bytes, alg: str | None = None) -> str:
    """Hex HMAC of `body` for a digest algorithm name (used by the sandbox and tests)."""
    name = (alg or DEFAULT_DIGEST_ALG).strip().upper()
    if name not in DIGEST_ALGORITHMS:
        raise ValueError(f"unknown digest algorithm {name[:40]!r}")
    return hmac.new(secret, body, DIGEST_ALGORITHMS[name]).hexdigest()


def check_webhook_digest(secret: bytes, body: bytes, digest: str | None, alg: str | None) -> DigestResult:
    """Why a webhook is (not) authentic. Constant-time in the digest comparison."""
    if not secret:
        return DigestResult.NO_SECRET  # an empty key would let anyone sign
    if not digest:
        return DigestResult.MISSING_DIGEST
    name = (alg or DEFAULT_DIGEST_ALG).strip().upper()
    hash_fn = DIGEST_ALGORITHMS.get(name)
    if hash_fn is None:
        return DigestResult.UNKNOWN_ALGORITHM
    expected = hmac.new(secret, body, hash_fn).hexdigest().encode()
    try:
        given = digest.strip().lower().encode("ascii")
    except UnicodeEncodeError:
        return DigestResult.MISMATCH
    return DigestResult.OK if hmac.compare_digest(expected, given) else DigestResult.MISMATCH


def verify_webhook_digest(secret: bytes, body: bytes, digest: str | None, alg: str | None) -> bool:
    """True only for an authentic body (see `check_webhook_digest` for the reason)."""
    return check_webhook_digest(secret, body, digest, alg) is DigestResult.OK


# --- request signing (pure) ----------------------------------------------------------------


def sign_request(secret: bytes, ts: int | str, method: str, path_with_query: str, body: bytes = b"") -> str:
    """`X-App-Access-Sig`: hex HMAC-SHA256(secret, ts + METHOD + path?query + body)."""
    message = str(ts).encode() + method.upper().encode() + path_with_query.encode() + (body or b"")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class _SumsubAuth(httpx.Auth):
    """Signs the request as it will be sent (after httpx built path, query and body)."""

    requires_request_body = True

    def __init__(self, app_token: str, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self._app_token = app_token
        self._secret = secret
        self._clock = clock

    def auth_flow(self, request: httpx.Request):
        ts = int(self._clock())
        path = request.url.raw_path.decode("ascii")  # path plus ?query, percent-encoded
        request.headers["X-App-Token"] = self._app_token
        request.headers["X-App-Access-Ts"] = str(ts)
        request.headers["X-App-Access-Sig"] = sign_request(self._secret, ts, request.method, path, request.content)
        yield request


# --- client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplicantStatus:
    applicant_id: str
    review_status: str  # init, pending, queued, onHold, completed …
    review_answer: str | None  # GREEN / RED when completed
    reject_type: str | None  # RETRY / FINAL for RED
    reject_labels: tuple[str, ...]


@dataclass(frozen=True)
class Applicant:
    applicant_id: str
    external_user_id: str
    created: bool  # False when Sumsub already had one for this user (reused, docs/sandbox.md)


class SumsubClient(ProviderClient):
    provider = "sumsub"

    def __init__(
        self,
        base_url: str,
        app_token: str,
        secret_key: bytes,
        *,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
        rate_limit: int = 100,
        rate_window_s: int = 60,
        max_rate_wait_s: float = 30.0,
        retries: int = 0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(http or make_client(base_url, timeout=timeout), retries=retries, sleep=sleep)
        if not app_token or not secret_key:
            raise AuthenticationError("SUMSUB_APP_TOKEN / SUMSUB_SECRET_KEY not configured",
                                      provider=self.provider, operation="configure")
        self._auth = _SumsubAuth(app_token, secret_key)
        self._limiter = WindowRateLimiter(
            RedisBackend(client=get_redis()), key("ratelimit", "sumsub"), limit=rate_limit, window=rate_window_s
        )
        self._max_rate_wait_s = max_rate_wait_s

    def _take_slot(self, operation: str) -> None:
        """Wait (up to max_rate_wait_s) for a slot in the shared 100/min window."""
        deadline = time.monotonic() + self._max_rate_wait_s
        while True:
            with self._limiter.acquire(raise_on_failure=False) as acquired:
                if acquired:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RateLimitedError("Sumsub request budget for this minute is used up",
                                       provider=self.provider, operation=operation, retry_after_s=1.0)
            self._sleep(min(0.25, remaining))

    def _signed(self, operation: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self._take_slot(operation)
        return self._send(operation, method, path, auth=self._auth, **kwargs)

    def get_applicant_status(self, applicant_id: str) -> ApplicantStatus:
        path = f"/resources/applicants/{quote(applicant_id, safe='')}/status"

        def attempt() -> ApplicantStatus:
            response = self._signed("status", "GET", path)
            data = self._json(response, "status")
            review_status = data.get("reviewStatus")
            if not isinstance(review_status, str):
                raise self._malformed("status", "reviewStatus missing", response.status_code)
            raw_result = data.get("reviewResult")
            result: dict[str, Any] = raw_result if isinstance(raw_result, dict) else {}
            raw_labels = result.get("rejectLabels")
            labels: list[Any] = raw_labels if isinstance(raw_labels, list) else []
            return ApplicantStatus(
                applicant_id,
                review_status,
                result.get("reviewAnswer") if isinstance(result.get("reviewAnswer"), str) else None,
                result.get("reviewRejectType") if isinstance(result.get("reviewRejectType"), str) else None,
                tuple(x for x in labels if isinstance(x, str)),
            )

        return self._guarded(get_breaker(SUMSUB), attempt)

    def create_applicant(self, external_user_id: str, level_name: str) -> Applicant:
        """Create an applicant; if Sumsub already has one for this user (409), reuse it."""
        path = f"/resources/applicants?levelName={quote(level_name, safe='')}"
        body = json.dumps({"externalUserId": external_user_id}).encode()

        def attempt() -> Applicant:
            try:
                response = self._signed("create_applicant", "POST", path, content=body,
                                        headers={"Content-Type": "application/json"})
            except ConflictError:
                return self._applicant_by_external_id(external_user_id)
            return self._applicant(response, "create_applicant", created=True)

        return self._guarded(get_breaker(SUMSUB), attempt)

    def _applicant_by_external_id(self, external_user_id: str) -> Applicant:
        path = f"/resources/applicants/-;externalUserId={quote(external_user_id, safe='')}/one"
        return self._applicant(self._signed("get_applicant", "GET", path), "get_applicant", created=False)

    def _applicant(self, response: httpx.Response, operation: str, *, created: bool) -> Applicant:
        data = self._json(response, operation)
        applicant_id, external = data.get("id"), data.get("externalUserId")
        if not isinstance(applicant_id, str) or not applicant_id or not isinstance(external, str):
            raise self._malformed(operation, "id/externalUserId missing", response.status_code)
        return Applicant(applicant_id, external, created)
