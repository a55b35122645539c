"""The one httpx client factory (sync and async) for every outbound provider call.

- Timeouts: `ATTEMPT_TIMEOUT_S` (30 s, docs/providers.md) for read/write/pool, a shorter connect timeout.
- Connection pooling: one client per provider client object, reused across calls and threads.
- Limits on what comes back: a response body over `MAX_RESPONSE_BYTES` (1 MiB; the providers'
  JSON answers are a few KiB) raises `ResponseTooLarge`, and a body still arriving when the
  attempt's deadline (its timeout, counted from the request) has passed raises
  `httpx.ReadTimeout`: httpx's read timeout is per chunk, so a body trickled a byte at a time
  would otherwise only be cut by the job's time limit.
- `X-Request-ID` on every request: a header the caller set wins (PISP initiation uses the
  transaction's idempotency key); otherwise the running job's request id (set by
  worker.middleware.RequestContext); otherwise a fresh UUID.
"""

from __future__ import annotations

import functools
import select
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpcore
import httpx

from worker.context import request_id_var
from worker.retry import ATTEMPT_TIMEOUT_S

REQUEST_ID_HEADER = "X-Request-ID"
CONNECT_TIMEOUT_S = 5.0
USER_AGENT = "drop-worker/0.1"
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30)


MAX_RESPONSE_BYTES = 1024 * 1024


class ResponseTooLarge(httpx.DecodingError):
    """The provider's answer exceeded MAX_RESPONSE_BYTES; reading stopped there."""


def _check(received: int, deadline: float, request: httpx.Request, limit: int) -> None:
    if received > limit:
        raise ResponseTooLarge(f"response body over {limit} bytes", request=request)
    if time.monotonic() > deadline:
        raise httpx.ReadTimeout("response body not complete within the attempt deadline", request=request)


class _BoundedStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, request: httpx.Request, deadline: float, limit: int) -> None:
        self._inner, self._request, self._deadline, self._limit = inner, request, deadline, limit

    def __iter__(self) -> Iterator[bytes]:
        received = 0
        for chunk in self._inner:
            received += len(chunk)
            _check(received, self._deadline, self._request, self._limit)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _AsyncBoundedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request, deadline: float, limit: int) -> None:
        self._inner, self._request, self._deadline, self._limit = inner, request, deadline, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._inner:
            received += len(chunk)
            _check(received, self._deadline, self._request, self._limit)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def _bound(response: httpx.Response, seconds: float, limit: int) -> None:
    request = response.request
    deadline = request.extensions.get("drop_started", time.monotonic()) + seconds
    declared = response.headers.get("Content-Length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge(f"response body over {limit} bytes", request=request)
    if isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _AsyncBoundedStream(response.stream, request, deadline, limit)
    else:
        response.stream = _BoundedStream(response.stream, request, deadline, limit)


def _bounded_hooks(seconds: float, limit: int) -> tuple:
    def on_request(request: httpx.Request) -> None:
        request.extensions["drop_started"] = time.monotonic()

    def on_response(response: httpx.Response) -> None:
        _bound(response, seconds, limit)

    async def on_request_async(request: httpx.Request) -> None:
        on_request(request)

    async def on_response_async(response: httpx.Response) -> None:
        on_response(response)

    return on_request, on_response, on_request_async, on_response_async


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


def _client_options(base_url: str, timeout: float, headers: Mapping[str, str] | None,
                    hooks: dict[str, list[Any]], transport: Any) -> dict[str, Any]:
    """What the sync and the async client share: base URL, timeouts, limits, headers, hooks."""
    return {"base_url": base_url.rstrip("/"), "timeout": make_timeout(timeout), "limits": DEFAULT_LIMITS,
            "headers": _headers(headers), "event_hooks": hooks, "transport": transport, "follow_redirects": False}


def make_client(
    base_url: str,
    *,
    timeout: float = ATTEMPT_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> httpx.Client:
    """A pooled sync client for `base_url` that stamps X-Request-ID on every request."""
    on_request, on_response, _, _ = _bounded_hooks(timeout, max_response_bytes)
    hooks = {"request": [_stamp_request_id, on_request], "response": [on_response]}
    return httpx.Client(**_client_options(base_url, timeout, headers, hooks, transport))


def make_async_client(
    base_url: str,
    *,
    timeout: float = ATTEMPT_TIMEOUT_S,
    headers: Mapping[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> httpx.AsyncClient:
    """The async twin of `make_client` (for AsyncIO actors); same defaults, same header."""
    _, _, on_request, on_response = _bounded_hooks(timeout, max_response_bytes)
    hooks = {"request": [_stamp_request_id_async, on_request], "response": [on_response]}
    return httpx.AsyncClient(**_client_options(base_url, timeout, headers, hooks, transport))


# --- a cheaper idle-connection check for the async provider clients ---------------------------
# The one place that reaches into httpx/httpcore internals (the pool's network backend).


def _socket_readable(sock: Any) -> bool:
    """Readable or closed (what httpcore asks of an idle connection): one poll(), no wait."""
    if sock is None or sock.fileno() == -1:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _ReadableCheckStream(httpcore.AsyncNetworkStream):
    """An httpcore network stream whose `is_readable` check is one poll() on a socket looked up
    once. httpcore asks it of every idle connection of a pool for each request it assigns and
    each response it closes; anyio's stream answers by building its whole extra-attributes
    table (a dict of lambdas) every time — ~15 % of the loop's CPU at 1000 reads/s. Everything
    else is the anyio stream's own behaviour."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._sock = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return _ReadableCheckStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._sock is not None:
            return _socket_readable(self._sock)
        return self._inner.get_extra_info(info)


class _ReadableCheckBackend(httpcore.AnyIOBackend):
    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return _ReadableCheckStream(await super().connect_tcp(*args, **kwargs))


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One default TLS context (certifi's CAs) for every shard of every async client: building it
    is most of the cost of a transport (~20 ms; a client has 32 shards)."""
    return httpx.create_ssl_context()


def fast_async_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport, its httpcore pool using `_ReadableCheckBackend` (asyncio loops only:
    it is what httpcore's auto backend picks there)."""
    transport = httpx.AsyncHTTPTransport(limits=limits, verify=_tls_context())
    # httpx has no public way to give its transport a network backend: its pool's private one is
    # replaced (tests/worker/test_http.py fails if an upgrade renames either attribute).
    pool = getattr(transport, "_pool", None)
    if isinstance(pool, httpcore.AsyncConnectionPool) and hasattr(pool, "_network_backend"):
        pool._network_backend = _ReadableCheckBackend()
    return transport
