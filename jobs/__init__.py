"""drop-worker's jobs (the domain). Importing this package declares every job on `jobs.registry`
and builds no broker: `jobs.app` is the composition root.

Names are the enqueue contract (docs/enqueue.md). Python callers enqueue with `jobs.enqueue()`, which
writes the outbox row (in the caller's transaction when a connection is given); the relay
moves it to the broker. Nothing reaches Redis that PostgreSQL does not know about first.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from db import outbox
from db.outbox import INTERNAL_PRODUCER_CTE
from db.pool import Conn, transaction
from jobs.registry import registry
from worker.alerts import send_alert
from worker.registry import InvalidPayload

__all__ = ["INTERNAL_PRODUCER_CTE", "InvalidPayload", "ReservedKeyError", "UnknownJobError", "enqueue",
           "enqueue_internal", "known_jobs", "registry"]


class UnknownJobError(ValueError):
    pass


# Keys with this prefix belong to drop-worker's own producers; PostgreSQL refuses them from
# anyone else (migration 0006), so a caller cannot pre-insert an internal job's key.
RESERVED_KEY_PREFIX = "drop:"


class ReservedKeyError(ValueError):
    pass


def known_jobs() -> list[str]:
    return registry.names()


def enqueue(
    job: str,
    payload: dict[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    conn: Conn | None = None,
    delay: timedelta | None = None,
    available_at: datetime | None = None,
) -> int | None:
    """Insert a job into `job_outbox`; return its id, or None if the key was already used.

    Pass `conn` to enqueue inside your own transaction (the job exists only if you commit).
    A repeated `idempotency_key` is a no-op: that is how callers make enqueueing exact.
    """
    if job not in registry:
        raise UnknownJobError(f"unknown job {job!r}; known: {', '.join(known_jobs())}")
    payload = payload or {}
    if not isinstance(payload, dict):
        raise TypeError("payload must be a JSON object (dict)")
    json.dumps(payload)  # fail here, not in the relay, on something JSON cannot carry
    registry.check_payload(job, payload)  # InvalidPayload (a ValueError) naming the field
    key = idempotency_key or f"{job}:{uuid.uuid4()}"
    if key.startswith(RESERVED_KEY_PREFIX):
        raise ReservedKeyError(f"idempotency keys starting with {RESERVED_KEY_PREFIX!r} are reserved "
                               "for drop-worker's own producers")
    if available_at is None and delay is not None:
        available_at = datetime.now().astimezone() + delay
    if conn is not None:
        return outbox.insert(conn, job, payload, key, available_at)
    with transaction() as own:
        return outbox.insert(own, job, payload, key, available_at)


def enqueue_internal(
    job: str,
    payload: dict[str, Any],
    *,
    key: str,
    conn: Conn,
    available_at: datetime | None = None,
) -> tuple[int, bool]:
    """An internal producer's enqueue, in the caller's transaction: `(outbox id, inserted now)`.

    `key` is prefixed with the reserved prefix. The same key with the same job and payload (and
    a due time no later than asked) is the producer's own earlier enqueue: its id comes back.
    A key taken by anything else — a row planted before the reserved prefix existed, or a bug —
    must not suppress the work: on-call is alerted and the job is enqueued under a fresh key.
    """
    full_key = key if key.startswith(RESERVED_KEY_PREFIX) else RESERVED_KEY_PREFIX + key
    outbox_id = outbox.insert_internal(conn, job, payload, full_key, available_at)
    if outbox_id is not None:
        return outbox_id, True
    existing = outbox.holder_of_key(conn, full_key, available_at)
    if existing is not None:
        if existing["job"] == job and existing["payload"] == json.loads(json.dumps(payload)) \
                and existing["due_in_time"]:
            return existing["id"], False
    send_alert(
        "high",
        "Internal job key taken",
        f"The key of an internal {job} job was already used by a different job, payload or due "
        "time; the job was enqueued under a fresh key. Find the row that holds the key.",
        key=f"internal-key-taken:{job}",
        runbook="internal-job-key-taken",
    )
    fresh = outbox.insert_internal(conn, job, payload, f"{full_key}:{uuid.uuid4().hex}", available_at)
    assert fresh is not None  # a fresh random key cannot be taken
    return fresh, True


# Declare every family's jobs on the registry (order does not matter).
from jobs import aisp, aisp_batch, housekeeping, kyc, pisp, sca  # noqa: E402, F401
