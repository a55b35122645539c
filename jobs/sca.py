"""SCA timeout expiry: `sca.expire_timeouts` (every minute; docs/payments.md).

A payment still `processing` past `created_at + SCA_TIMEOUT_SECONDS` (docs/payments.md: no SCA
callback in time) is, under its row lock and in one PostgreSQL transaction:

1. polled once: a final status at the bank wins (an accepted payment is never failed);
2. otherwise cancelled at the provider (Berlin Group DELETE), so a late SCA cannot execute it; a
   refused cancellation (e.g. 400 CANCELLATION_INVALID: the payment just became final) is
   followed by one more status read;
3. failed with `SCA_TIMEOUT` exactly once (conditional update), the cached balance restored at
   most once (ledger), the user notified to retry, an audit row written, and the first
   late-completion check scheduled (watched for 24 h by `pisp.poll_status`).

The provider being unreachable (5xx, timeout, breaker open) does not stop the expiry: the
payment is expired and watched. Each payment is its own transaction; a payment whose row is
locked (a poll is talking to the provider) is left for the next minute.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from datetime import datetime
from typing import Any

from prometheus_client import Counter

from db.pool import Conn, transaction
from jobs import payments as rules
from jobs import pisp
from jobs.registry import registry
from worker.providers import get_neonomics
from worker.providers.errors import (
    NotFoundError,
    ProviderPermanentError,
    ProviderTransientError,
)
from worker.settings import get_settings

log = logging.getLogger(__name__)

EXPIRE_JOB = "sca.expire_timeouts"
BATCH_LIMIT = 500
# Stop starting new payments after this long; the next minute's run continues (time limit 150 s).
RUN_BUDGET_S = 40.0

SCA_EXPIRATIONS = Counter(
    "drop_payment_sca_expirations_total",
    "Payments failed by SCA timeout, by what the provider said to the cancellation "
    "(cancelled, already_cancelled, needs_authorisation, refused, unreachable, not_found, no_payment_id)",
    ["cancellation"],
)


def due_payments(now: datetime, timeout_s: int, *, limit: int = BATCH_LIMIT) -> list[str]:
    """Ids of processing payments past their SCA deadline at `now`, oldest first."""
    cutoff = rules.expiry_cutoff(now, timeout_s)
    with transaction() as conn:
        rows = conn.execute(
            """SELECT id FROM transactions
                WHERE status = 'processing' AND created_at <= %s
                ORDER BY created_at LIMIT %s""",
            (cutoff, limit),
        ).fetchall()
    return [r["id"] for r in rows]


def _lock_expired(conn: Conn, transaction_id: str, cutoff: datetime) -> dict[str, Any] | None:
    # SKIP LOCKED: a poll holding the row is mid provider call; the next run looks again.
    row = conn.execute(
        f"""SELECT {pisp.COLUMNS} FROM transactions
             WHERE id = %s AND status = 'processing' AND created_at <= %s
             FOR UPDATE SKIP LOCKED""",
        (transaction_id, cutoff),
    ).fetchone()
    if row is not None:
        conn.execute(f"SET LOCAL lock_timeout = {int(pisp.ACCOUNT_LOCK_TIMEOUT_MS)}")
    return row


def _read(payment_id: str) -> tuple[str | None, bool]:
    """(code or NOT_FOUND or None, provider reachable?). An unusable answer is treated as
    'not final', so the expiry goes on to cancel."""
    try:
        code, _error = pisp.read_status(payment_id)
    except ProviderTransientError:  # 5xx, timeout, connection, breaker open
        return None, False
    return code, True


def _cancel(payment_id: str) -> rules.Cancellation:
    try:
        result = get_neonomics().cancel_payment(payment_id)
    except NotFoundError:
        return rules.Cancellation.NOT_FOUND
    except ProviderPermanentError:  # 400/405 CANCELLATION_INVALID and other refusals
        return rules.Cancellation.REFUSED
    except ProviderTransientError:
        return rules.Cancellation.UNREACHABLE
    if result.needs_authorisation:
        return rules.Cancellation.NEEDS_AUTHORISATION
    if result.transaction_status in (None, "CANC"):
        return rules.Cancellation.CANCELLED
    return rules.Cancellation.NEEDS_AUTHORISATION  # cancellation accepted but not yet final: watch


def apply_sca_timeout(
    conn: Conn,
    row: dict[str, Any],
    now: datetime,
    *,
    code: str | None,
    cancellation: rules.Cancellation,
    reads: int,
) -> pisp.Applied | None:
    """processing → failed / SCA_TIMEOUT, exactly once, with restore, notification, audit and
    the first late-completion check."""
    watch = rules.watch_after_expiry(cancellation)
    next_at = now + rules.next_watch_delay(0) if watch else None
    status_code = None if code in (None, rules.NOT_FOUND) else rules.normalise_code(code)
    done = conn.execute(
        """UPDATE transactions
              SET status = 'failed', failure_reason = 'SCA_TIMEOUT',
                  provider_status = COALESCE(%(code)s, provider_status),
                  timed_out_at = %(now)s, next_poll_at = %(next)s, poll_step = %(step)s,
                  last_polled_at = CASE WHEN %(reads)s > 0 THEN %(now)s ELSE last_polled_at END,
                  poll_count = poll_count + %(reads)s, updated_at = %(now)s
            WHERE id = %(id)s AND status = 'processing'
        RETURNING poll_count""",
        {"id": row["id"], "code": status_code, "now": now, "next": next_at, "step": 1 if watch else 0,
         "reads": reads},
    ).fetchone()
    if done is None:
        return None
    balance = pisp.restore_balance(conn, row, now)
    pisp.notify(conn, row["user_id"], rules.NOTIFY_SCA_TIMEOUT, rules.MESSAGES[rules.REASON_SCA_TIMEOUT])
    pisp.audit(conn, row, "payment_sca_timeout", {
        "reason": rules.REASON_SCA_TIMEOUT, "provider_status": status_code, "cancellation": cancellation.value,
        "watch_until": rules.watch_ends_at(now).isoformat() if watch else None, "amount": row["amount"],
        **balance,
    })
    if next_at is not None:
        pisp.schedule_poll(conn, row["id"], next_at)
    return pisp.Applied("sca_timeout", "sca_timeout", (now - row["created_at"]).total_seconds(), done["poll_count"])


def expire_payment(transaction_id: str, *, now: datetime | None = None, timeout_s: int | None = None) -> str:
    """Expire one payment if it is still processing past its deadline at `now`; returns the
    outcome (skipped, sca_timeout, complete, fail)."""

    now = now or pisp.utcnow()
    timeout_s = timeout_s or get_settings().sca_timeout_seconds
    cancellation: rules.Cancellation | None = None
    with transaction() as conn:
        row = _lock_expired(conn, transaction_id, rules.expiry_cutoff(now, timeout_s))
        if row is None:
            return "skipped"
        payment_id = row["payment_id"]
        code, reachable, reads = None, True, 0
        if payment_id:
            code, reachable = _read(payment_id)
            reads += 1
        action = rules.decide_expiry_after_status(code, reachable=reachable, has_payment_id=bool(payment_id))
        if action is rules.ExpiryAction.CANCEL:
            assert payment_id is not None
            cancellation = _cancel(payment_id)
            if cancellation is rules.Cancellation.REFUSED:
                # Refused usually means the payment just became final: read once more.
                recheck, reachable = _read(payment_id)
                reads += 1
                if reachable and rules.decide_expiry_after_status(
                    recheck, reachable=True, has_payment_id=True
                ) is rules.ExpiryAction.APPLY_STATUS:
                    action, code = rules.ExpiryAction.APPLY_STATUS, recheck
                elif recheck is not None:
                    code = recheck
        elif action is rules.ExpiryAction.EXPIRE:
            if not payment_id:
                cancellation = rules.Cancellation.NO_PAYMENT_ID
            elif not reachable:
                cancellation = rules.Cancellation.UNREACHABLE
            else:
                cancellation = rules.Cancellation.ALREADY_CANCELLED

        if action is rules.ExpiryAction.APPLY_STATUS:
            decision = rules.decide_poll(rules.PollPlan.POLL, pisp.state_of(row), code, now)
            applied = pisp.apply_decision(conn, row, decision, code, now, reads=reads)
        else:
            assert cancellation is not None
            applied = apply_sca_timeout(conn, row, now, code=code, cancellation=cancellation, reads=reads)
    pisp.after_commit(applied)
    if applied is None:
        return "unchanged"
    if applied.action == "sca_timeout" and cancellation is not None:
        SCA_EXPIRATIONS.labels(cancellation.value).inc()
        log.info("payment %s expired (SCA timeout, cancellation %s)", transaction_id, cancellation.value)
    return applied.action


def expire_due(
    now: datetime | None = None,
    *,
    timeout_s: int | None = None,
    limit: int = BATCH_LIMIT,
    budget_s: float = RUN_BUDGET_S,
) -> dict[str, int]:
    """Expire every payment past its SCA deadline at `now`; returns counts by outcome."""

    now = now or pisp.utcnow()
    timeout_s = timeout_s or get_settings().sca_timeout_seconds
    started = time.monotonic()
    tally: Tally[str] = Tally()
    ids = due_payments(now, timeout_s, limit=limit)
    for index, transaction_id in enumerate(ids):
        if time.monotonic() - started > budget_s:
            tally["deferred"] += len(ids) - index
            break
        try:
            tally[expire_payment(transaction_id, now=now, timeout_s=timeout_s)] += 1
        except Exception:
            # One payment's trouble must not hold up the others; it is retried next minute.
            log.exception("could not expire payment %s", transaction_id)
            tally["error"] += 1
    return dict(tally)


@registry.job(EXPIRE_JOB, queue="sca", time_limit=150_000)
def expire_timeouts(slot: str | None = None) -> None:
    counts = expire_due()
    if counts:
        log.info("sca.expire_timeouts: %s", counts)
