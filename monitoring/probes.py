"""Read-only probes of the system's state, shared by `drop-jobs status` and the monitor."""

from __future__ import annotations

import json
import time
from typing import Any

import dramatiq

from worker.redis_client import get_redis, key


def queue_stats(broker: dramatiq.Broker) -> list[dict[str, Any]]:
    """Ready, delayed and (Redis-side) dead messages per declared queue."""
    client = broker.client  # type: ignore[attr-defined]
    ns = broker.namespace  # type: ignore[attr-defined]
    queues = sorted(q for q in broker.get_declared_queues() if not q.endswith(".DQ"))
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.llen(f"{ns}:{q}")
        pipe.llen(f"{ns}:{q}.DQ")
        pipe.zcard(f"{ns}:{q}.XQ")
    values = pipe.execute()
    return [
        {"queue": q, "ready": values[3 * i], "delayed": values[3 * i + 1], "dead": values[3 * i + 2]}
        for i, q in enumerate(queues)
    ]


def workers_alive(broker: dramatiq.Broker, within_ms: int = 30_000) -> int:
    """Worker consumers whose heartbeat Dramatiq saw recently."""
    client = broker.client  # type: ignore[attr-defined]
    now_ms = int(time.time() * 1000)
    return int(client.zcount(f"{broker.namespace}:__heartbeats__", now_ms - within_ms, "+inf"))  # type: ignore[attr-defined]


def breaker_states() -> dict[str, str]:
    """Circuit breaker states as published by worker.breaker (empty until a breaker was used)."""
    try:
        from worker.breaker import breaker_states as states
    except ImportError:
        return {}
    return states()


def scheduler_leader() -> dict[str, Any] | None:
    raw = get_redis().get(key("scheduler", "leader"))
    return None if raw is None else json.loads(raw)
