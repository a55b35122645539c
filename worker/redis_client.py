"""The Redis connection used outside the Dramatiq broker (breaker state, alert windows, leases).

Every key goes through `key()` so that a whole deployment (or a test) lives under one
namespace (`DROP_REDIS_NAMESPACE`) and never sees another's keys.
"""

from __future__ import annotations

import redis

from worker.process_local import ProcessLocal
from worker.settings import get_settings

_clients: ProcessLocal[str, redis.Redis] = ProcessLocal(close=lambda client: client.close())


def get_redis() -> redis.Redis:
    """A process-wide client (thread-safe connection pool, rebuilt in a forked child)."""
    settings = get_settings()
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set (run through `drop-jobs` or `make run`)")
    url = settings.redis_url
    return _clients.get(url, lambda: redis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=30))


def reset_redis() -> None:
    """Forget the cached client (tests, and after settings change)."""
    _clients.clear()


def key(*parts: str) -> str:
    """`<namespace>:<part>:<part>` — the only way code names a Redis key."""
    return ":".join((get_settings().redis_namespace, *parts))
