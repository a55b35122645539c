"""The one httpx client factory (sync and async) for every outbound provider call.

- Timeouts: `ATTEMPT_TIMEOUT_S` (30 s, seed §3.3) for read/write/pool, a shorter connect timeout.
- Connection pooling: one client per provider client object, reused across calls and threads.
- `X-Request-ID` on every request: a header the caller set wins (PISP initiation uses the
  transaction's idempotency key); otherwise the running job's request id (set by
  worker.middleware.RequestContext); otherwise a fresh UUID.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import httpx

from worker.middleware import request_id_var
from worker.retry import ATTEMPT_TIMEOUT_S

REQUEST_ID_HEADER = "X-Request-ID"
CONNECT_TIMEOUT_S = 5.0
USER_AGENT = "drop-worker/0.1"
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30)


def current_request_id() -> str:
    """The job's request id, or a new UUID outside a job (each call gets its own)."""
    return request_id_var.get() or str(uuid.uuid4())


def make_timeout(seconds: float = ATTEMPT_TIMEOUT_S) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(CONNECT_TIMEOUT_S, seconds))


def _stamp_request_id(request: httpx.Request) -> None:
    if REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = current_request_id()


async def _stamp_request_id_async(request: httpx.Request) -> None:
    _stamp_request_id(request)


def _headers(extra: Mapping[str, str] | None) -> dict[str, str]:
    return {"User-Agent": USER_AGENT, "Accept": "application/json", **(extra or {})}


def make_client(
    base_url: str,
    *,
    timeout: float = ATTEMPT_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """A pooled sync client for `base_url` that stamps X-Request-ID on every request."""
    return httpx.Client(
        base_url=base_url.rstrip("/"),
        timeout=make_timeout(timeout),
        limits=DEFAULT_LIMITS,
        headers=_headers(headers),
        event_hooks={"request": [_stamp_request_id]},
        transport=transport,
        follow_redirects=False,
    )


def make_async_client(
    base_url: str,
    *,
    timeout: float = ATTEMPT_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The async twin of `make_client` (for AsyncIO actors); same defaults, same header."""
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        timeout=make_timeout(timeout),
        limits=DEFAULT_LIMITS,
        headers=_headers(headers),
        event_hooks={"request": [_stamp_request_id_async]},
        transport=transport,
        follow_redirects=False,
    )
