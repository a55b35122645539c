"""Dead-letter tooling (Dramatiq has none): list, show, replay and purge.

Dead letters are recorded in PostgreSQL by worker.middleware.DeadLetters. Replaying a job that
came through the outbox reopens its outbox row, so the relay sends it again with the same
idempotency key; any other message is re-enqueued with its retry count reset.
"""

from __future__ import annotations

from typing import Any

import dramatiq

from db.pool import transaction
from worker.pii import scrub_text


def _filter(ids: list[int] | None, job: str | None) -> tuple[str, list[Any]]:
    clauses, params = ["replayed_at IS NULL"], []
    if ids is not None:
        clauses.append("id = ANY(%s)")
        params.append(ids)
    if job:
        clauses.append("job = %s")
        params.append(job)
    return " AND ".join(clauses), params


def list_dead_letters(*, limit: int = 50, job: str | None = None) -> list[dict]:
    where, params = _filter(None, job)
    with transaction() as conn:
        return conn.execute(
            f"SELECT id, job, queue_name, reason, retries, failed_at, outbox_id FROM dead_letters "
            f"WHERE {where} ORDER BY failed_at DESC LIMIT %s",
            [*params, limit],
        ).fetchall()


def get_dead_letter(dead_letter_id: int) -> dict | None:
    with transaction() as conn:
        return conn.execute("SELECT * FROM dead_letters WHERE id = %s", (dead_letter_id,)).fetchone()


def describe(row: dict) -> dict:
    """What on-call may see: everything but payload values (they may hold personal data)."""
    message = row["message"] or {}
    return {
        "id": row["id"],
        "job": row["job"],
        "queue": row["queue_name"],
        "reason": scrub_text(row["reason"] or ""),  # rows stored before reasons were scrubbed
        "retries": row["retries"],
        "failed_at": row["failed_at"],
        "outbox_id": row["outbox_id"],
        "message_id": row["message_id"],
        "payload_keys": sorted((message.get("kwargs") or {}).keys()),
        "replayed_at": row["replayed_at"],
    }


def replay(ids: list[int] | None, *, job: str | None = None) -> int:
    broker = dramatiq.get_broker()
    where, params = _filter(ids, job)
    count = 0
    with transaction() as conn:
        rows = conn.execute(
            f"SELECT * FROM dead_letters WHERE {where} ORDER BY id FOR UPDATE SKIP LOCKED",
            params,
        ).fetchall()
        for row in rows:
            if row["outbox_id"] is not None:
                reopened = conn.execute(
                    """UPDATE job_outbox SET error = NULL, relayed_at = NULL, available_at = now()
                        WHERE id = %s AND done_at IS NULL""",
                    (row["outbox_id"],),
                ).rowcount
                if reopened:
                    conn.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = %s", (row["id"],))
                    count += 1
                    continue
            data = dict(row["message"])
            options = {
                k: v for k, v in (data.get("options") or {}).items() if k not in ("retries", "redis_message_id", "eta")
            }
            message = dramatiq.Message(
                queue_name=data["queue_name"].removesuffix(".DQ"),
                actor_name=data["actor_name"],
                args=tuple(data.get("args") or ()),
                kwargs=data.get("kwargs") or {},
                options=options,
            )
            broker.enqueue(message)
            conn.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = %s", (row["id"],))
            count += 1
    return count


def purge(ids: list[int] | None, *, job: str | None = None) -> int:
    broker = dramatiq.get_broker()
    where, params = _filter(ids, job)
    with transaction() as conn:
        rows = conn.execute(
            f"DELETE FROM dead_letters WHERE {where} RETURNING queue_name, message",
            params,
        ).fetchall()
    client = getattr(broker, "client", None)
    if client is not None:
        for row in rows:
            redis_id = ((row["message"] or {}).get("options") or {}).get("redis_message_id")
            if redis_id:
                xq = f"{broker.namespace}:{row['queue_name'].removesuffix('.DQ')}.XQ"
                client.zrem(xq, redis_id)
                client.hdel(f"{xq}.msgs", redis_id)
    return len(rows)
