"""Dead-letter tooling (Dramatiq has none): list, show, replay and purge.

Dead letters are recorded in PostgreSQL by worker.middleware.DeadLetters. Replaying a job that
came through the outbox reopens its outbox row, so the relay sends it again with the same
idempotency key; any other message is re-enqueued with its retry count reset.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import dramatiq

from db import audit as audit_log
from db import outbox
from db.audit import Audit
from db.pool import Conn, transaction
from worker import dramatiq_redis
from worker.pii import scrub_text
from worker.redis_client import get_redis
from worker.settings import get_settings


def list_dead_letters(*, limit: int = 50, job: str | None = None, reason: str | None = None,
                      after: tuple[datetime, int] | None = None) -> list[dict]:
    """Open dead letters, newest first; `reason` matches part of the reason, `after` pages on."""
    with transaction() as conn:
        return outbox.list_dead_letters(conn, limit=limit, job=job, reason=reason, after=after)


def count_dead_letters(*, job: str | None = None, reason: str | None = None) -> int:
    """How many open dead letters a filter matches (what "replay all matching" would touch)."""
    with transaction() as conn:
        return outbox.count_open_dead_letters(conn, job=job, reason=reason)


def get_dead_letter(dead_letter_id: int) -> dict | None:
    with transaction() as conn:
        return outbox.get_dead_letter(conn, dead_letter_id)


def describe(row: dict) -> dict:
    """What on-call may see: everything but payload values (they may hold personal data)."""
    message = row["message"] or {}
    return {
        "id": row["id"],
        "job": row["job"],
        "queue": row["queue_name"],
        "reason": scrub_text(row["reason"] or ""),  # rows stored before reasons were scrubbed
        "retries": row["retries"],
        "attempts": row["retries"] + 1,
        "first_failed_at": row.get("first_failed_at"),
        "failed_at": row["failed_at"],
        "outbox_id": row["outbox_id"],
        "message_id": row["message_id"],
        "payload_keys": sorted((message.get("kwargs") or {}).keys()),
        "replayed_at": row["replayed_at"],
    }


def _audit(conn: Conn, audit: Audit | None, rows: list[dict]) -> None:
    """The audit row of an operator's action, in the action's transaction: ids, never payloads."""
    if audit is not None:
        audit_log.record(conn, audit.action, {
            **audit.details,
            "count": len(rows),
            "dead_letter_ids": [r["id"] for r in rows],
            "outbox_ids": [r["outbox_id"] for r in rows if r["outbox_id"] is not None],
        })


def replay(ids: list[int] | None, *, job: str | None = None, reason: str | None = None,
           broker: dramatiq.Broker | None = None, audit: Audit | None = None) -> int:
    """Send dead letters again: a job from the outbox by reopening its row (same idempotency
    key), any other message re-enqueued with its retry count reset. Dramatiq's Redis copy of
    each replayed message goes too: no view keeps showing a failure that was dealt with.
    `audit`: the action is recorded in audit_log with the ids replayed, in the same transaction."""
    count = 0
    replayed: list[dict] = []
    with transaction() as conn:
        for row in outbox.lock_open_dead_letters(conn, ids, job, reason):
            replayed.append(row)
            if row["outbox_id"] is not None and outbox.reopen(conn, row["outbox_id"]):
                outbox.mark_replayed(conn, row["id"])
                count += 1
                continue
            data = dict(row["message"])
            options = {
                k: v for k, v in (data.get("options") or {}).items() if k not in ("retries", "redis_message_id", "eta")
            }
            message: dramatiq.Message[Any] = dramatiq.Message(
                queue_name=data["queue_name"].removesuffix(".DQ"),
                actor_name=data["actor_name"],
                args=tuple(data.get("args") or ()),
                kwargs=data.get("kwargs") or {},
                options=options,
            )
            (broker or dramatiq_redis.global_broker()).enqueue(message)
            outbox.mark_replayed(conn, row["id"])
            count += 1
        _audit(conn, audit, replayed)
    _drop_redis_copies(replayed)
    return count


def _drop_redis_copies(rows: list[dict]) -> None:
    ns = dramatiq_redis.namespace(get_settings())
    client = get_redis()
    for row in rows:
        redis_id = ((row["message"] or {}).get("options") or {}).get("redis_message_id")
        if redis_id:
            dramatiq_redis.drop_dead_message(client, ns, row["queue_name"], redis_id)


def purge(ids: list[int] | None, *, job: str | None = None, reason: str | None = None,
          audit: Audit | None = None) -> int:
    """Delete dead letters (PostgreSQL and Dramatiq's Redis dead-letter set)."""
    with transaction() as conn:
        rows = outbox.delete_open_dead_letters(conn, ids, job, reason)
        _audit(conn, audit, rows)
    _drop_redis_copies(rows)
    return len(rows)
