"""drop-worker's jobs. Importing this package installs the broker and registers every actor.

Names are the enqueue contract (docs/enqueue.md). Python callers enqueue with `jobs.enqueue()`, which
writes the outbox row (in the caller's transaction when a connection is given); the relay
moves it to the broker. Nothing reaches Redis that PostgreSQL does not know about first.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from worker.broker import setup_broker

broker = setup_broker()


class UnknownJobError(ValueError):
    pass


# Keys with this prefix belong to drop-worker's own producers; PostgreSQL refuses them from
# anyone else (migration 0006), so a caller cannot pre-insert an internal job's key.
RESERVED_KEY_PREFIX = "drop:"


class ReservedKeyError(ValueError):
    pass


def known_jobs() -> list[str]:
    return sorted(broker.get_declared_actors())


def enqueue(
    job: str,
    payload: dict[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    conn: psycopg.Connection | None = None,
    delay: timedelta | None = None,
    available_at: datetime | None = None,
) -> int | None:
    """Insert a job into `job_outbox`; return its id, or None if the key was already used.

    Pass `conn` to enqueue inside your own transaction (the job exists only if you commit).
    A repeated `idempotency_key` is a no-op: that is how callers make enqueueing exact.
    """
    if job not in broker.actors:
        raise UnknownJobError(f"unknown job {job!r}; known: {', '.join(known_jobs())}")
    payload = payload or {}
    if not isinstance(payload, dict):
        raise TypeError("payload must be a JSON object (dict)")
    json.dumps(payload)  # fail here, not in the relay, on something JSON cannot carry
    key = idempotency_key or f"{job}:{uuid.uuid4()}"
    if key.startswith(RESERVED_KEY_PREFIX):
        raise ReservedKeyError(f"idempotency keys starting with {RESERVED_KEY_PREFIX!r} are reserved "
                               "for drop-worker's own producers")
    if available_at is None and delay is not None:
        available_at = datetime.now().astimezone() + delay
    sql = """INSERT INTO job_outbox (job, payload, idempotency_key, available_at)
             VALUES (%s, %s, %s, COALESCE(%s, now()))
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING id"""
    params = (job, Jsonb(payload), key, available_at)
    if conn is not None:
        row = conn.execute(sql, params).fetchone()
    else:
        from db.pool import transaction

        with transaction() as own:
            row = own.execute(sql, params).fetchone()
    return None if row is None else _first(row)


def _first(row: Any) -> Any:
    return row["id"] if isinstance(row, dict) else row[0]


# The CTE that makes one statement an internal producer's (see migration 0006).
INTERNAL_PRODUCER_CTE = "producer AS (SELECT job_outbox_as_internal_producer())"
_INTERNAL_INSERT = f"""WITH {INTERNAL_PRODUCER_CTE}
    INSERT INTO job_outbox (job, payload, idempotency_key, available_at)
    SELECT %s, %s, %s, COALESCE(%s, now()) FROM producer
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id"""


def enqueue_internal(
    job: str,
    payload: dict[str, Any],
    *,
    key: str,
    conn: psycopg.Connection,
    available_at: datetime | None = None,
) -> tuple[int, bool]:
    """An internal producer's enqueue, in the caller's transaction: `(outbox id, inserted now)`.

    `key` is prefixed with the reserved prefix. The same key with the same job and payload (and
    a due time no later than asked) is the producer's own earlier enqueue: its id comes back.
    A key taken by anything else — a row planted before the reserved prefix existed, or a bug —
    must not suppress the work: on-call is alerted and the job is enqueued under a fresh key.
    """
    full_key = key if key.startswith(RESERVED_KEY_PREFIX) else RESERVED_KEY_PREFIX + key
    row = conn.execute(_INTERNAL_INSERT, (job, Jsonb(payload), full_key, available_at)).fetchone()
    if row is not None:
        return _first(row), True
    existing = conn.execute(
        """SELECT id, job, payload, available_at <= COALESCE(%s, now()) + interval '1 minute' AS due_in_time
             FROM job_outbox WHERE idempotency_key = %s""",
        (available_at, full_key),
    ).fetchone()
    if existing is not None:
        existing = existing if isinstance(existing, dict) else dict(zip(("id", "job", "payload", "due_in_time"),
                                                                          existing, strict=True))
        if existing["job"] == job and existing["payload"] == json.loads(json.dumps(payload)) \
                and existing["due_in_time"]:
            return existing["id"], False
    from monitoring.alerts import send_alert

    send_alert(
        "high",
        "Internal job key taken",
        f"The key of an internal {job} job was already used by a different job, payload or due "
        "time; the job was enqueued under a fresh key. Find the row that holds the key.",
        key=f"internal-key-taken:{job}",
        runbook="internal-job-key-taken",
    )
    fresh = conn.execute(_INTERNAL_INSERT, (job, Jsonb(payload), f"{full_key}:{uuid.uuid4().hex}", available_at))
    return _first(fresh.fetchone()), True


# Register the actors (import for side effects; order does not matter).
from jobs import aisp, housekeeping, kyc, outbox, pisp, sca  # noqa: E402, F401
