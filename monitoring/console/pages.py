"""What each console page shows, as data: blocking reads (PostgreSQL, Redis) run on the monitor's
handler threads. The same functions as the CLI wherever the CLI has one (`monitoring.status`,
`worker.dlq`, `db.outbox`); nothing here returns a payload value, and every free text that could
hold personal data (reasons, errors, idempotency keys) passes through `worker.pii.scrub_text`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from db import outbox
from db.pool import transaction
from jobs.aisp_rules import QUOTA_LIMIT, QUOTA_WINDOW, quota_decision
from jobs.schedules import OSLO, SCHEDULES, next_fire
from monitoring.health import run_checks
from monitoring.status import collect_status
from worker import breaker, dlq, probes
from worker.pii import scrub_text
from worker.redis_client import get_redis
from worker.settings import get_settings

PAGE_SIZE = 50
RECENT_SLOTS = 10


class BadFilter(ValueError):
    """A filter the operator typed that cannot be used; the message says which and why."""


def _redis_reachable() -> bool:
    try:
        get_redis().ping()
    except redis.RedisError:
        return False
    return True


def _text(query: Mapping[str, str], name: str, max_len: int = 200) -> str | None:
    value = (query.get(name) or "").strip()
    if len(value) > max_len:
        raise BadFilter(f"{name} is longer than {max_len} characters")
    return value or None


def _int(query: Mapping[str, str], name: str) -> int | None:
    value = (query.get(name) or "").strip()
    if not value:
        return None
    if not value.isdigit() or len(value) > 18:
        raise BadFilter(f"{name} must be a whole number")
    return int(value)


def _oslo_time(query: Mapping[str, str], name: str) -> datetime | None:
    """An <input type=datetime-local> value, read as Oslo wall-clock time."""
    value = (query.get(name) or "").strip()
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).replace(tzinfo=OSLO)
    except ValueError:
        raise BadFilter(f"{name} must be a date and time (YYYY-MM-DDTHH:MM)") from None


def _no_personal_data(name: str, value: str | None) -> str | None:
    """A search text that looks like personal data is refused: the console neither shows nor
    probes for it (a match count would tell whether a national id is in a reason)."""
    if value is not None and scrub_text(value) != value:
        raise BadFilter(f"{name} looks like personal data; search by job, id or error code instead")
    return value


# --- overview ------------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    """Is it healthy: the health checks, queues, outbox, a chart of the last hour, dead letters,
    breakers, scheduler and the error-spike window."""
    reachable = _redis_reachable()
    status = collect_status(redis_reachable=reachable)
    health_code, health = run_checks()
    ages = probes.queue_oldest_age([q["queue"] for q in status["queues"]]) if reachable and status["queues"] else {}
    for q in status["queues"] or []:
        q["oldest_age_s"] = ages.get(q["queue"], 0.0)
    with transaction() as conn:
        chart = outbox.outcomes_per_minute(conn, 60)
    errors = probes.job_errors() if reachable else {}
    threshold = get_settings().error_spike_threshold
    return {
        "status": status,
        "healthy": health_code == 200 and not status["attention"],
        "health": health,
        "chart": chart,
        "chart_max": max([1] + [max(int(m["done"]), int(m["failed"])) for m in chart]),
        "errors_in_window": sum(errors.values()),
        "errors_by_job": sorted(errors.items()),
        "error_window_s": probes.ERROR_WINDOW_S,
        "error_spike": sum(errors.values()) > threshold,
        "error_spike_threshold": threshold,
    }


# --- jobs (job_outbox) ---------------------------------------------------------------------


@dataclass(frozen=True)
class JobFilter:
    job: str | None = None
    state: str | None = None
    key_prefix: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    before_id: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> JobFilter:
        state = _text(query, "state")
        if state is not None and state not in outbox.STATES:
            raise BadFilter(f"state must be one of {', '.join(outbox.STATES)}")
        return cls(job=_text(query, "job"), state=state,
                   key_prefix=_no_personal_data("key prefix", _text(query, "key_prefix", 500)),
                   created_from=_oslo_time(query, "from"), created_to=_oslo_time(query, "to"),
                   before_id=_int(query, "before"))


def _job_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "idempotency_key": scrub_text(row["idempotency_key"]),
            "error": scrub_text(row["error"]) if row["error"] else None}


def jobs_page(f: JobFilter) -> dict[str, Any]:
    with transaction() as conn:
        rows = outbox.search(conn, job=f.job, state=f.state, key_prefix=f.key_prefix, created_from=f.created_from,
                             created_to=f.created_to, before_id=f.before_id, limit=PAGE_SIZE + 1)
        names = outbox.job_names(conn)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return {"rows": [_job_row(r) for r in rows], "next_before": rows[-1]["id"] if more else None,
            "job_names": names, "states": list(outbox.STATES)}


def job_detail(outbox_id: int) -> dict[str, Any] | None:
    with transaction() as conn:
        row = outbox.get_row(conn, outbox_id)
    if row is None:
        return None
    return {**_job_row(row), "payload_keys": [scrub_text(k) for k in row["payload_keys"]]}


# --- dead letters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetterFilter:
    job: str | None = None
    reason: str | None = None
    after: tuple[datetime, int] | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> DeadLetterFilter:
        after = None
        if query.get("after"):
            at, _, last_id = query["after"].partition("|")
            try:
                after = (datetime.fromisoformat(at), int(last_id))
            except ValueError:
                raise BadFilter("after is not a page mark this console made") from None
        return cls(job=_text(query, "job"), reason=_no_personal_data("reason", _text(query, "reason")), after=after)


def dead_letters_page(f: DeadLetterFilter) -> dict[str, Any]:
    rows = dlq.list_dead_letters(limit=PAGE_SIZE + 1, job=f.job, reason=f.reason, after=f.after)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    with transaction() as conn:
        by_job = outbox.open_dead_letters_by_job(conn)
    return {
        "rows": [{**r, "reason": scrub_text(r["reason"] or ""), "attempts": r["retries"] + 1} for r in rows],
        "matching": dlq.count_dead_letters(job=f.job, reason=f.reason),
        "next_after": f"{rows[-1]['failed_at'].isoformat()}|{rows[-1]['id']}" if more else None,
        "job_names": [r["job"] for r in by_job],
    }


def dead_letter_detail(dead_letter_id: int) -> dict[str, Any] | None:
    row = dlq.get_dead_letter(dead_letter_id)
    return None if row is None else dlq.describe(row)  # what `drop-jobs dlq show` prints


# --- breakers and scheduler -------------------------------------------------------------------


def breakers_page() -> dict[str, Any]:
    if not _redis_reachable():
        return {"redis_reachable": False, "breakers": [], "transitions": []}
    return {"redis_reachable": True, "breakers": list(breaker.breaker_statuses().values()),
            "transitions": breaker.recent_transitions(50)}


def scheduler_page(now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    with transaction() as conn:
        fires = conn.execute(
            """SELECT job, slot, status, leader, fired_at, outbox_id FROM (
                   SELECT f.*, row_number() OVER (PARTITION BY job ORDER BY slot DESC) AS n FROM scheduler_fires f
               ) recent WHERE n <= %s ORDER BY job, slot DESC""",
            (RECENT_SLOTS,),
        ).fetchall()
        outcome = outbox.states(conn, [f["outbox_id"] for f in fires if f["outbox_id"] is not None])
    schedules = [
        {"job": s.job, "why": s.why, "next_fire": next_fire(s, now),
         "slots": [{**f, "outcome": outcome.get(f["outbox_id"], "pruned") if f["status"] == "fired" else "missed"}
                   for f in fires if f["job"] == s.job]}
        for s in SCHEDULES
    ]
    leader = probes.scheduler_leader() if _redis_reachable() else None
    return {"schedules": schedules, "leader": leader}


# --- PSD2: one bank account's unattended reads ------------------------------------------------


def psd2_page(bank_account_id: str | None, now: datetime | None = None) -> dict[str, Any]:
    """Unattended (scheduler) reads of the account in the rolling 24 h, and when the next one is
    allowed: the quota rule's answer, later if the bank said 429, never without a valid consent."""
    if not bank_account_id:
        return {"account": None}
    now = now or datetime.now(UTC)
    with transaction() as conn:
        account = conn.execute(
            """SELECT id, consent_status, needs_relink, consent_expires_at, aisp_paused_until, balance_synced_at
                 FROM bank_accounts WHERE id = %s""",
            (bank_account_id,),
        ).fetchone()
        reads = conn.execute(
            """SELECT requested_at, initiated_by, outcome, http_status, error_code FROM aisp_reads
                WHERE bank_account_id = %s AND requested_at > %s ORDER BY requested_at DESC""",
            (bank_account_id, now - QUOTA_WINDOW),
        ).fetchall()
    if account is None:
        return {"account": None, "unknown": True}
    unattended = [r for r in reads if r["initiated_by"] == "scheduler"]
    decision = quota_decision([r["requested_at"] for r in unattended], now)
    next_allowed: datetime | None = now if decision.allowed else decision.retry_at
    if account["aisp_paused_until"] is not None and next_allowed is not None:
        next_allowed = max(next_allowed, account["aisp_paused_until"])
    no_consent = account["consent_status"] != "valid" or account["needs_relink"]
    return {"account": account, "reads": reads, "unattended": len(unattended), "limit": QUOTA_LIMIT,
            "window_h": QUOTA_WINDOW / timedelta(hours=1), "next_allowed": None if no_consent else next_allowed,
            "no_consent": no_consent, "now": now}
