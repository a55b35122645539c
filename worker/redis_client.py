"""The Redis connection used outside the Dramatiq broker (breaker state, alert windows, leases).

Every key goes through `key()` so that a whole deployment (or a test) lives under one
namespace (`DROP_REDIS_NAMESPACE`) and never sees another's keys.
"""

from __future__ import annotations

import os
import threading

import redis

from worker.settings import get_settings

_lock = threading.Lock()
_client: redis.Redis | None = None
_client_pid: int | None = None


def get_redis() -> redis.Redis:
    """A process-wide client (thread-safe connection pool, rebuilt after fork)."""
    global _client, _client_pid
    client = _client
    if client is not None and _client_pid == os.getpid():
        return client  # the common case, without the lock every middleware call contended on
    with _lock:
        if _client is None or _client_pid != os.getpid():
            settings = get_settings()
            if not settings.redis_url:
                raise RuntimeError("REDIS_URL is not set (run through `drop-jobs` or `make run`)")
            _client = redis.Redis.from_url(
                settings.redis_url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=30
            )
            _client_pid = os.getpid()
        return _client


def reset_redis() -> None:
    """Forget the cached client (tests, and after settings change)."""
    global _client
    with _lock:
        if _client is not None:
            _client.close()
        _client = None


def key(*parts: str) -> str:
    """`<namespace>:<part>:<part>` — the only way code names a Redis key."""
    return ":".join((get_settings().redis_namespace, *parts))
