"""drop-worker's jobs. Importing this package installs the broker and registers every actor.

Names are the enqueue contract (DESIGN.md). Python callers enqueue with `jobs.enqueue()`, which
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
    if row is None:
        return None
    return row["id"] if isinstance(row, dict) else row[0]


# Register the actors (import for side effects; order does not matter).
from jobs import aisp, housekeeping, kyc, outbox, pisp, sca  # noqa: E402, F401
