"""`GET /v1/health` checks: PostgreSQL, Redis, scheduler heartbeat, workers alive, outbox relay alive.

Each check runs with its own deadline so the endpoint answers within about a second even when
a dependency hangs; a check that times out fails with reason "timeout".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from psycopg_pool import ConnectionPool

from db.pool import database_url
from worker.probes import scheduler_leader, workers_alive
from worker.redis_client import get_redis
from worker.relay import RELAY_HEARTBEAT_TTL_S, relays_alive

CHECK_TIMEOUT_S = 0.8


_health_pool_lock = threading.Lock()
_health_pool_for: tuple[str, Any] | None = None


def _health_pool(url: str) -> Any:
    """A pool of its own for the checks (not the jobs' pool, which may be what is exhausted):
    a probe every few seconds, or a caller hammering `/v1/health`, reuses at most two
    connections instead of opening one per request."""

    global _health_pool_for
    with _health_pool_lock:
        if _health_pool_for is not None and _health_pool_for[0] == url:
            return _health_pool_for[1]
        if _health_pool_for is not None:  # DATABASE_URL changed (tests): one pool at a time
            _health_pool_for[1].close(timeout=0)
        pool = ConnectionPool(url, min_size=0, max_size=2, timeout=1, open=True, name="drop-health",
                              kwargs={"connect_timeout": 1}, check=ConnectionPool.check_connection)
        _health_pool_for = (url, pool)
        return pool


def check_postgres() -> dict[str, Any]:
    with _health_pool(database_url()).connection() as conn:
        conn.execute("SET statement_timeout = 700")
        conn.execute("SELECT 1")
    return {"ok": True}


def check_redis() -> dict[str, Any]:
    get_redis().ping()
    return {"ok": True}


def check_scheduler() -> dict[str, Any]:
    leader = scheduler_leader()
    if leader is None:
        return {"ok": False, "reason": "no scheduler leader heartbeat in the last 30 s"}
    return {"ok": True, "leader": leader.get("leader"), "age_s": round(time.time() - leader["heartbeat"], 1)}


def check_workers() -> dict[str, Any]:
    alive = workers_alive()
    if alive < 1:
        return {"ok": False, "reason": "no worker heartbeat in the last 30 s", "alive": 0}
    return {"ok": True, "alive": alive}


def check_relay() -> dict[str, Any]:
    alive = relays_alive()
    if alive < 1:
        return {"ok": False, "reason": f"no outbox relay heartbeat in the last {RELAY_HEARTBEAT_TTL_S} s",
                "alive": 0}
    return {"ok": True, "alive": alive}


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "postgres": check_postgres,
    "redis": check_redis,
    "scheduler": check_scheduler,
    "workers": check_workers,
    "relay": check_relay,
}


_inflight_lock = threading.Lock()
_inflight: dict[tuple[str, Callable[[], dict[str, Any]]], Future[dict[str, Any]]] = {}


def _start(name: str, fn: Callable[[], dict[str, Any]]) -> Future[dict[str, Any]]:
    """Run a check in its own daemon thread, unless the previous run of it still hangs: then
    reuse that one. A dependency that hangs therefore ties up one thread, not one per request."""
    with _inflight_lock:
        running = _inflight.get((name, fn))
        if running is not None and not running.done():
            return running
        future: Future[dict[str, Any]] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as error:
                future.set_exception(error)

        threading.Thread(target=run, name=f"health-{name}", daemon=True).start()
        _inflight[(name, fn)] = future
        return future


def run_checks(checks: dict[str, Callable[[], dict[str, Any]]] | None = None,
               timeout: float = CHECK_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 {"status":"ok"} or 503 naming each failing check."""
    checks = checks or CHECKS
    futures = {name: _start(name, fn) for name, fn in checks.items()}
    deadline = time.monotonic() + timeout
    results: dict[str, Any] = {}
    for name, future in futures.items():
        try:
            results[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            results[name] = {"ok": False, "reason": f"timeout: no answer within {timeout:.1f} s"}
        except Exception as error:
            results[name] = {"ok": False, "reason": type(error).__name__}
    failing = sorted(name for name, r in results.items() if not r.get("ok"))
    if failing:
        return 503, {"status": "fail", "failing": failing, "checks": results}
    return 200, {"status": "ok", "checks": results}
