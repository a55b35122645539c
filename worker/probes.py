"""Read-only probes of the system's state, shared by `drop-jobs status` and the monitor."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from db import outbox
from db.pool import one_row, transaction
from worker import breaker, dramatiq_redis
from worker.redis_client import get_redis, key
from worker.settings import get_settings


def _dramatiq() -> tuple[Any, str]:
    return get_redis(), dramatiq_redis.namespace(get_settings())


def queues(declared: Iterable[str] = ()) -> list[str]:
    """The job registry's queues (`declared`) and those of this process's broker, if any."""
    return dramatiq_redis.declared_queues(declared)


def queue_stats(names: Iterable[str]) -> list[dict[str, Any]]:
    """Ready, delayed and (Redis-side) dead messages per queue."""
    client, ns = _dramatiq()
    return dramatiq_redis.queue_stats(client, ns, list(names))


def queue_oldest_age(names: list[str]) -> dict[str, float]:
    """Age in seconds of the oldest ready message per queue (0 when empty)."""
    client, ns = _dramatiq()
    return dramatiq_redis.queue_oldest_age(client, ns, names)


def workers_alive(within_ms: int = 30_000) -> int:
    """Worker consumers whose heartbeat Dramatiq saw recently."""
    client, ns = _dramatiq()
    return dramatiq_redis.workers_alive(client, ns, within_ms)


def breaker_states() -> dict[str, str]:
    """Circuit breaker states shared in Redis by worker.breaker: name → closed|open|half-open."""
    return {name: status.state for name, status in breaker_statuses().items()}


def breaker_statuses() -> dict[str, Any]:
    """worker.breaker's BreakerStatus per breaker, read from Redis (the shared truth)."""
    return breaker.breaker_statuses()


# --- error window (written by worker.middleware.ErrorCounter on every job error) ----------

ERROR_WINDOW_S = 60

# Redis server time, so workers on different machines agree on the window.
_RECORD_ERROR = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"""
_WINDOW_MEMBERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""


def errors_key() -> str:
    return key("alerts", "job_errors")


def record_job_error(job: str, event_id: str) -> int:
    """Count one job error in the shared 60 s window; returns the window's size."""
    window_ms = ERROR_WINDOW_S * 1000
    return int(get_redis().eval(_RECORD_ERROR, 1, errors_key(), f"{job}|{event_id}", window_ms))


def job_errors(window_s: int = ERROR_WINDOW_S) -> dict[str, int]:
    """Job errors in the last `window_s` seconds across all workers, per job name."""
    members = get_redis().eval(_WINDOW_MEMBERS, 1, errors_key(), window_s * 1000)
    counts: dict[str, int] = {}
    for member in members:
        job = (member.decode() if isinstance(member, bytes) else str(member)).rsplit("|", 1)[0]
        counts[job] = counts.get(job, 0) + 1
    return counts


# --- PostgreSQL-derived state ----------------------------------------------------------------

KYC_REVIEWED = ("approved", "rejected", "retry")


def database_state() -> dict[str, Any]:
    """Everything the monitor derives from PostgreSQL, in one short read-only transaction."""
    with transaction() as conn:
        conn.execute("SET LOCAL statement_timeout = 2000")
        dead = outbox.open_dead_letters_by_job(conn)
        backlog = outbox.backlog(conn)
        kyc: dict[str, Any] = one_row(conn.execute(
            """SELECT count(*) FILTER (WHERE result = 'approved') AS approved,
                      count(*) AS reviewed
                 FROM screening_results
                WHERE screening_type = 'kyc' AND result = ANY(%s)
                  AND created_at > now() - interval '1 hour'""",
            (list(KYC_REVIEWED),),
        ).fetchone())
        # An account never synced counts from its creation: it is the stalest of all.
        aisp: dict[str, Any] = one_row(conn.execute(
            """SELECT count(*) AS accounts,
                      COALESCE(extract(epoch FROM now() - min(COALESCE(balance_synced_at, created_at))), 0)::float8
                        AS oldest,
                      count(*) FILTER (WHERE balance_synced_at IS NULL) AS never_synced
                 FROM bank_accounts
                WHERE consent_status = 'valid' AND needs_relink = false"""
        ).fetchone())
        fires = conn.execute(
            """SELECT job, extract(epoch FROM max(slot))::float8 AS last_slot,
                      extract(epoch FROM max(fired_at))::float8 AS last_fired
                 FROM scheduler_fires WHERE status = 'fired' GROUP BY job"""
        ).fetchall()
        missed = conn.execute(
            "SELECT job, count(*) AS n FROM scheduler_fires WHERE status = 'missed' GROUP BY job"
        ).fetchall()
    return {
        "dead_letters": {r["job"]: int(r["n"]) for r in dead},
        "dead_letters_newest_id": max((int(r["newest"]) for r in dead), default=0),
        "outbox_backlog": int(backlog["backlog"]),
        "outbox_oldest_age_s": float(backlog["oldest"]),
        "kyc_approved": int(kyc["approved"]),
        "kyc_reviewed": int(kyc["reviewed"]),
        "aisp_accounts": int(aisp["accounts"]),
        "aisp_oldest_age_s": float(aisp["oldest"]),
        "aisp_never_synced": int(aisp["never_synced"]),
        "schedule_last_fire": {r["job"]: float(r["last_slot"]) for r in fires},
        "schedule_missed": {r["job"]: int(r["n"]) for r in missed},
    }


def scheduler_leader() -> dict[str, Any] | None:
    raw = get_redis().get(key("scheduler", "leader"))
    return None if raw is None else json.loads(raw)
