"""Bench-only shim: `pisp.poll_status` as it was before issue 15 item 6 (the comparison row), so
that `python -m bench polls` measures the old and the new path within one run:

    python -m dramatiq jobs.app bench.polls_before --queues pisp

One message per poll (no chunks); each poll locks its transaction row (FOR UPDATE, 2 s lock
timeout), asks Neonomics with the sync client while holding the row lock and a pooled PostgreSQL
connection, and applies the answer in that same transaction. The effects are the shared ones
(jobs.pisp.apply_decision), so only the shape of the path differs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

import jobs.app
from db.pool import Conn, transaction
from jobs import payments as rules
from jobs import pisp
from worker import relay
from worker.context import mark_outbox_done
from worker.outcomes import RunLater, as_actor_fn
from worker.providers.errors import CircuitOpenError, ProviderPermanentError
from worker.retry import PermanentError

LOCK_TIMEOUT_MS = 2000


def lock_for_poll(conn: Conn, transaction_id: str) -> dict[str, Any] | None:
    conn.execute(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT_MS)}")
    try:
        with conn.transaction():
            row = conn.execute(f"SELECT {pisp.COLUMNS} FROM transactions WHERE id = %s FOR UPDATE",
                               (transaction_id,)).fetchone()
    except psycopg.errors.LockNotAvailable:
        raise pisp.PaymentBusy(transaction_id) from None
    conn.execute(f"SET LOCAL lock_timeout = {int(pisp.ACCOUNT_LOCK_TIMEOUT_MS)}")
    return row


def poll_payment(transaction_id: str, *, due: str | None = None, now: datetime | None = None) -> str:
    pisp.validate_poll_payload(transaction_id, due)
    now = now or pisp.utcnow()
    error: ProviderPermanentError | None = None
    with transaction() as conn:
        row = lock_for_poll(conn, transaction_id)
        if row is None:
            raise PermanentError(f"{pisp.POLL_JOB}: transaction {transaction_id} not found")
        plan = rules.plan_poll(pisp.state_of(row), due)
        if plan in (rules.PollPlan.SKIP_FINAL, rules.PollPlan.SKIP_STALE):
            mark_outbox_done(conn)
            applied = None
        else:
            code = None
            if row["payment_id"]:
                code, error = pisp.read_status(row["payment_id"])  # the provider call, row locked
            decision = rules.decide_poll(plan, pisp.state_of(row), code, now, adhoc=due is None,
                                         error=error is not None)
            applied = pisp.apply_decision(conn, row, decision, code, now, reads=1 if row["payment_id"] else 0)
            mark_outbox_done(conn)
    pisp.after_commit(applied)
    if error is not None:
        raise error
    return applied.action if applied else "skip"


def poll_status(transaction_id: str, due: str | None = None) -> RunLater | None:
    try:
        poll_payment(transaction_id, due=due)
    except CircuitOpenError as exc:
        return RunLater(pisp.retry_delay_ms(exc.retry_after_s), f"circuit {exc.breaker} open")
    except pisp.PaymentBusy:
        return RunLater(pisp.retry_delay_ms(1.0), "payment busy")
    return None


relay.chunked = lambda broker, messages, sizes: messages  # type: ignore[assignment]
jobs.app.broker.get_actor(pisp.POLL_JOB).fn = as_actor_fn(poll_status)
