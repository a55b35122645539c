"""What every provider client shares: one HTTP attempt through a breaker, typed errors,
metrics, and optional in-process retries that follow `worker.retry` (one policy)."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
from prometheus_client import Counter, Histogram

from worker.breaker import SharedCircuitBreaker
from worker.http import MAX_RESPONSE_BYTES, ResponseTooLarge
from worker.providers.errors import (
    CircuitOpenError,
    MalformedResponseError,
    ProviderError,
    error_for_response,
    error_for_transport,
)
from worker.retry import MAX_RETRIES, backoff_ms, is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")

PROVIDER_REQUESTS = Counter(
    "drop_provider_requests_total",
    "Provider HTTP requests by outcome (ok, or the error class name)",
    ["provider", "operation", "outcome"],
)
PROVIDER_LATENCY = Histogram(
    "drop_provider_request_seconds",
    "Provider HTTP request latency (one attempt)",
    ["provider", "operation"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)


def call_with_retries(
    fn: Callable[[], T],
    *,
    retries: int = MAX_RETRIES,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call `fn`; on a transient error wait `backoff_ms(n)` (1 s, 2 s, 4 s + jitter) and retry,
    at most `retries` times. Permanent errors and an open circuit are raised at once."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= retries or not is_transient(exc) or isinstance(exc, CircuitOpenError):
                raise
            delay = backoff_ms(attempt, rng=rng) / 1000
            log.info("transient provider error (%s); retry %d/%d in %.2f s",
                     type(exc).__name__, attempt + 1, retries, delay)
            sleep(delay)
            attempt += 1


class ProviderAnswers:
    """Reading a provider's answers: shared by the sync clients and the async Neonomics client,
    so both answer identically (they only read `self.provider`)."""

    provider = "provider"

    @contextmanager
    def _attempt(self, operation: str) -> Iterator[None]:
        """One HTTP attempt's bookkeeping (sync and async alike): transport failures and
        oversized answers become typed ProviderErrors; latency and outcome are recorded."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            try:
                yield
            except ResponseTooLarge:
                raise MalformedResponseError(f"response larger than {MAX_RESPONSE_BYTES} bytes",
                                             provider=self.provider, operation=operation) from None
            except httpx.TransportError as exc:
                raise error_for_transport(exc, provider=self.provider, operation=operation) from None
        except ProviderError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            PROVIDER_LATENCY.labels(self.provider, operation).observe(time.perf_counter() - started)
            PROVIDER_REQUESTS.labels(self.provider, operation, outcome).inc()

    def _checked(self, response: httpx.Response, operation: str) -> httpx.Response:
        if not response.is_success:
            raise error_for_response(response, provider=self.provider, operation=operation)
        return response

    def _json(self, response: httpx.Response, operation: str) -> dict[str, Any]:
        try:
            data = json.loads(response.content)
        except ValueError:
            raise MalformedResponseError(
                "body is not JSON", provider=self.provider, operation=operation, status=response.status_code
            ) from None
        if not isinstance(data, dict):
            raise MalformedResponseError(
                "body is not a JSON object", provider=self.provider, operation=operation,
                status=response.status_code,
            )
        return data

    def _malformed(self, operation: str, what: str, status: int | None = None) -> MalformedResponseError:
        return MalformedResponseError(what, provider=self.provider, operation=operation, status=status)


class ProviderClient(ProviderAnswers):
    """Base: owns one pooled httpx client; subclasses describe operations."""

    def __init__(
        self,
        http: httpx.Client,
        *,
        retries: int = 0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.http = http
        # Default 0: inside Dramatiq, the Retries middleware is the retry layer (the worker
        # thread is free during the backoff). Callers outside a job pass MAX_RETRIES.
        self.retries = retries
        self._sleep = sleep

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _guarded(self, breaker: SharedCircuitBreaker, attempt: Callable[[], T]) -> T:
        """One logical call: each attempt through the breaker, retried per the policy."""
        return call_with_retries(lambda: breaker.call(attempt), retries=self.retries, sleep=self._sleep)

    def _send(self, operation: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP attempt. Returns a 2xx response; raises a typed ProviderError otherwise."""
        with self._attempt(operation):
            return self._checked(self.http.request(method, path, **kwargs), operation)
