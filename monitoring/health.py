"""`GET /v1/health` checks: PostgreSQL, Redis, scheduler heartbeat, workers alive.

Each check runs with its own deadline so the endpoint answers within about a second even when
a dependency hangs; a check that times out fails with reason "timeout".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

CHECK_TIMEOUT_S = 0.8
_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")


def check_postgres() -> dict[str, Any]:
    import psycopg

    from db.pool import database_url

    # A fresh short connection: the pool may be exhausted or wedged, which is what we test.
    with psycopg.connect(database_url(), connect_timeout=1) as conn:
        conn.execute("SET statement_timeout = 700")
        conn.execute("SELECT 1")
    return {"ok": True}


def check_redis() -> dict[str, Any]:
    from worker.redis_client import get_redis

    get_redis().ping()
    return {"ok": True}


def check_scheduler() -> dict[str, Any]:
    from monitoring.probes import scheduler_leader

    leader = scheduler_leader()
    if leader is None:
        return {"ok": False, "reason": "no scheduler leader heartbeat in the last 30 s"}
    return {"ok": True, "leader": leader.get("leader"), "age_s": round(time.time() - leader["heartbeat"], 1)}


def check_workers() -> dict[str, Any]:
    import jobs
    from monitoring.probes import workers_alive

    alive = workers_alive(jobs.broker)
    if alive < 1:
        return {"ok": False, "reason": "no worker heartbeat in the last 30 s", "alive": 0}
    return {"ok": True, "alive": alive}


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "postgres": check_postgres,
    "redis": check_redis,
    "scheduler": check_scheduler,
    "workers": check_workers,
}


def run_checks(checks: dict[str, Callable[[], dict[str, Any]]] | None = None,
               timeout: float = CHECK_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 {"status":"ok"} or 503 naming each failing check."""
    checks = checks or CHECKS
    futures = {name: _executor.submit(fn) for name, fn in checks.items()}
    deadline = time.monotonic() + timeout
    results: dict[str, Any] = {}
    for name, future in futures.items():
        try:
            results[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            results[name] = {"ok": False, "reason": "timeout"}
        except Exception as error:
            results[name] = {"ok": False, "reason": type(error).__name__}
    failing = sorted(name for name, r in results.items() if not r.get("ok"))
    if failing:
        return 503, {"status": "fail", "failing": failing, "checks": results}
    return 200, {"status": "ok", "checks": results}
