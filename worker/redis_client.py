"""The Redis connection used outside the Dramatiq broker (breaker state, alert windows, leases),
and the one place a Redis URL becomes a client (the broker's included).

Every key goes through `key()` so that a whole deployment (or a test) lives under one
namespace (`DROP_REDIS_NAMESPACE`) and never sees another's keys.

`REDIS_URL` may name a Sentinel-managed primary (docs/scaling.md):

    redis+sentinel://[:password@]host:port[,host:port…]/service_name[/db][?sentinel_password=…]

The password is the primary's (and its replicas'); Sentinels that require their own
authentication take `sentinel_password`. A client asks the Sentinels for the current primary
on every new connection, and redis-py drops a connection that finds itself talking to a demoted
primary (READONLY), so after a failover the next command reaches the promoted replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import redis
from redis.sentinel import Sentinel

from worker.process_local import ProcessLocal
from worker.settings import get_settings

SENTINEL_SCHEME = "redis+sentinel://"
# Bounded waits everywhere: a command never hangs on a vanished server.
CLIENT_OPTIONS: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 3, "health_check_interval": 30}

_clients: ProcessLocal[str, redis.Redis] = ProcessLocal(close=lambda client: client.close())


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None
    sentinel_password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The parts of a `redis+sentinel://` URL; ValueError naming what is wrong (never the URL)."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError("not a redis+sentinel:// URL")
    rest, _, query = url[len(SENTINEL_SCHEME):].partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    password = unquote(userinfo.partition(":")[2]) if at and userinfo.partition(":")[2] else None
    sentinels = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError("each Sentinel must be host:port")
        sentinels.append((host.strip("[]"), int(port)))
    segments = [s for s in path.split("/") if s]
    if not segments or len(segments) > 2:
        raise ValueError("the path must be /service_name or /service_name/db")
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValueError("the database number must be an integer")
    sentinel_password = parse_qs(query).get("sentinel_password", [None])[0]
    return SentinelTarget(tuple(sentinels), segments[0], int(segments[1]) if len(segments) == 2 else 0,
                          password, sentinel_password)


def redis_from_url(url: str, **options: Any) -> redis.Redis:
    """A client for `url` (redis://, rediss://, unix:// or redis+sentinel://) with `options`
    (socket timeouts and the like) applied to every connection it opens."""
    if not url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    timeouts = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(list(target.sentinels),
                        sentinel_kwargs={**timeouts, "password": target.sentinel_password}, **timeouts)
    return sentinel.master_for(target.service, db=target.db, password=target.password, **options)


def get_redis() -> redis.Redis:
    """A process-wide client (thread-safe connection pool, rebuilt in a forked child)."""
    settings = get_settings()
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set (run through `drop-jobs` or `make run`)")
    url = settings.redis_url
    return _clients.get(url, lambda: redis_from_url(url, **CLIENT_OPTIONS))


def reset_redis() -> None:
    """Forget the cached client (tests, and after settings change)."""
    _clients.clear()


def key(*parts: str) -> str:
    """`<namespace>:<part>:<part>` — the only way code names a Redis key."""
    return ":".join((get_settings().redis_namespace, *parts))
