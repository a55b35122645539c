"""PISP payment status polling: `pisp.poll_status {transaction_id}` and `pisp.sweep` (docs/payments.md).

A poll locks its transaction row, asks Neonomics for the payment's status, decides with the
pure rules of `jobs.payments`, and applies the answer in that same PostgreSQL transaction with
conditional updates (`WHERE status = 'processing'`), the balance ledger, the notification, the
audit row, the next poll's outbox row and its own outbox mark. The row lock is held across the
provider call on purpose: a poll and the SCA expiry on the same payment never interleave their
provider call and their commit, so there is exactly one final outcome. A worker killed anywhere
before the commit leaves no trace; the rerun reads the provider again and decides again.

The schedule lives in PostgreSQL (`transactions.next_poll_at`): each pending poll enqueues its
successor through the outbox (`available_at` = due time), and `pisp.sweep` re-enqueues any poll
that is overdue, so polling survives lost messages, Redis loss and worker crashes. A scheduled
poll carries the `due` time it was made for and does nothing if the schedule has moved on, so
duplicates never fork the polling into parallel chains.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from prometheus_client import Counter, Histogram

import jobs
from db import audit as audit_log
from db import outbox
from db.pool import Conn, transaction
from jobs import payments as rules
from jobs.registry import HIGH_VOLUME_TRACES, registry
from worker import dramatiq_redis
from worker.alerts import send_alert
from worker.breaker import NEONOMICS_PISP, get_breaker
from worker.context import (
    attempts_so_far,
    current_outbox_id,
    mark_outbox_done,
    note_outbox_done,
    request_id,
    using_request_id,
)
from worker.loop import run_on_loop
from worker.middleware import dead_letter_job
from worker.outcomes import RunLater
from worker.providers import get_neonomics
from worker.providers.errors import (
    CircuitOpenError,
    NotFoundError,
    ProviderPermanentError,
)
from worker.providers.neonomics import get_async_neonomics
from worker.registry import chunk_outbox_ids
from worker.relay import job_message, request_id_for
from worker.retry import PermanentError, is_transient, should_retry

log = logging.getLogger(__name__)

POLL_JOB = "pisp.poll_status"
SWEEP_JOB = "pisp.sweep"
SWEEP_LIMIT = 1000
# How long an apply waits for a payment another job is working on (the short apply of another
# poll, a web tier update); the SCA expiry holds its row across its provider call: busy.
LOCK_TIMEOUT_MS = 2000
ACCOUNT_LOCK_TIMEOUT_MS = 15_000
MAX_ID_LENGTH = 200

# --- metrics (no ids in labels) ------------------------------------------------------------

PAYMENTS_FINAL = Counter(
    "drop_payments_final_total",
    "Payments that reached a final status, by outcome "
    "(completed, rejected, cancelled, not_found, sca_timeout, late_completion)",
    ["outcome"],
)
LATE_COMPLETIONS = Counter(
    "drop_payment_late_completions_total",
    "Payments failed by SCA timeout that the bank later reported accepted (completed after all)",
)
TIME_TO_FINAL = Histogram(
    "drop_payment_time_to_final_seconds",
    "Seconds from payment initiation (transactions.created_at) to its first final status",
    ["outcome"],
    buckets=(5, 10, 20, 30, 60, 120, 180, 300, 420, 600, 1800, 3600),
)
POLLS_PER_PAYMENT = Histogram(
    "drop_payment_polls_per_payment",
    "Provider status reads a payment needed before its first final status",
    buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50),
)
POLLS = Counter(
    "drop_payment_polls_total",
    "pisp.poll_status runs by result (completed, failed, pending, error, breaker_open, busy, skip_*)",
    ["result"],
)
STATUS_SEEN = Counter(
    "drop_payment_provider_status_total",
    "Berlin Group transactionStatus values read from the provider (unknown codes as 'unknown')",
    ["status"],
)


class PaymentBusy(Exception):
    """Another job holds this payment's row (its provider call is in flight): try again shortly."""


# --- loading ---------------------------------------------------------------------------------

COLUMNS = (
    "id, user_id, bank_account_id, amount, currency, payment_id, status, provider_status, "
    "failure_reason, next_poll_at, poll_step, poll_count, timed_out_at, created_at"
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def state_of(row: dict[str, Any]) -> rules.PaymentState:
    return rules.PaymentState(
        status=row["status"],
        failure_reason=row["failure_reason"],
        next_poll_at=row["next_poll_at"],
        timed_out_at=row["timed_out_at"],
        poll_step=row["poll_step"],
        has_payment_id=bool(row["payment_id"]),
    )


# --- effects (inside the caller's transaction) -----------------------------------------------


def notify(conn: Conn, user_id: str, kind: str, message: str) -> None:
    conn.execute("INSERT INTO notifications (user_id, kind, message) VALUES (%s, %s, %s)", (user_id, kind, message))


def audit(conn: Conn, row: dict[str, Any], action: str, details: dict[str, Any]) -> None:
    # Ids, codes and amounts only: no personal data in audit details.
    body = {"transaction_id": row["id"], "payment_id": row["payment_id"], "request_id": request_id(), **details}
    audit_log.record(conn, action, body, user_id=row["user_id"])


def _lock_account(conn: Conn, account_id: str) -> dict[str, Any] | None:
    # Locked so a concurrent balance sync cannot slip between our check and our update.
    return conn.execute(
        "SELECT id, balance, balance_synced_at, currency FROM bank_accounts WHERE id = %s FOR UPDATE",
        (account_id,),
    ).fetchone()


def restore_balance(conn: Conn, row: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Give a failed payment's amount back to the cached balance, at most once (ledger primary
    key), and only if that balance was synced before the payment was created."""

    def decide(account: dict[str, Any]) -> tuple[bool, str]:
        return rules.should_restore_balance(
            balance=account["balance"], balance_synced_at=account["balance_synced_at"],
            account_currency=account["currency"], payment_created_at=row["created_at"],
            payment_currency=row["currency"],
        )

    return _adjust_balance(conn, row, now, "restore", decide)


def redebit_balance(conn: Conn, row: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Undo the restore of a payment the bank completed after all, at most once."""

    def decide(account: dict[str, Any]) -> tuple[bool, str]:
        restore = conn.execute(
            "SELECT created_at FROM payment_balance_adjustments WHERE transaction_id = %s AND kind = 'restore'",
            (row["id"],),
        ).fetchone()
        return rules.should_redebit_balance(
            balance=account["balance"], balance_synced_at=account["balance_synced_at"],
            restored_at=restore["created_at"] if restore else None,
        )

    return _adjust_balance(conn, row, now, "redebit", decide)


# kind → (the result's flag, the note when the ledger already holds this adjustment, sign)
_ADJUSTMENTS = {"restore": ("balance_restored", "already_restored", 1),
                "redebit": ("balance_redebited", "already_redebited", -1)}


def _adjust_balance(conn: Conn, row: dict[str, Any], now: datetime, kind: str,
                    decide: Callable[[dict[str, Any]], tuple[bool, str]]) -> dict[str, Any]:
    """One balance adjustment of a payment, at most once: the ledger row (its primary key is
    (transaction, kind)) and the balance change commit together, or neither happens."""
    flag, already, sign = _ADJUSTMENTS[kind]
    account = _lock_account(conn, row["bank_account_id"]) if row["bank_account_id"] else None
    if account is None:
        return {flag: False, "balance_note": "no_account"}
    ok, why = decide(account)
    if not ok:
        return {flag: False, "balance_note": why}
    inserted = conn.execute(
        """INSERT INTO payment_balance_adjustments (transaction_id, kind, bank_account_id, amount, created_at)
           VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING amount""",
        (row["id"], kind, account["id"], row["amount"], now),
    ).fetchone()
    if inserted is None:
        return {flag: False, "balance_note": already}
    conn.execute("UPDATE bank_accounts SET balance = balance + %s, updated_at = now() WHERE id = %s",
                 (sign * row["amount"], account["id"]))
    return {flag: True, "balance_note": why}


def poll_key(transaction_id: str, due: datetime) -> str:
    return f"drop:{POLL_JOB}:{transaction_id}:due:{due.isoformat()}"


def schedule_poll(conn: Conn, transaction_id: str, due: datetime) -> None:
    """The outbox row of the poll due at `due` (deduplicated on transaction + due time)."""

    jobs.enqueue_internal(POLL_JOB, {"transaction_id": transaction_id, "due": due.isoformat()},
                          key=poll_key(transaction_id, due), conn=conn, available_at=due)


@dataclass
class Applied:
    """What was committed, for metrics and alerts after the commit."""

    action: str
    outcome: str | None = None  # PAYMENTS_FINAL label when the payment reached a final status
    seconds_to_final: float | None = None
    polls: int | None = None
    alert: tuple[str, str, str, str, str] | None = None  # severity, title, message, key, runbook


def apply_decision(
    conn: Conn,
    row: dict[str, Any],
    decision: rules.Decision,
    code: str | None,
    now: datetime,
    *,
    reads: int,
) -> Applied | None:
    """Apply a poll decision with conditional updates; None if the row was not in the expected
    state (someone else got there first: nothing is changed)."""
    status_code = None if code in (None, rules.NOT_FOUND) else rules.normalise_code(code)
    ctx = _Poll(code, status_code, now, {"id": row["id"], "code": status_code, "now": now, "reads": reads})
    handler = _HANDLERS.get(decision.action)
    if handler is None:
        raise ValueError(f"unknown action {decision.action}")
    return handler(conn, row, decision, ctx)


@dataclass(frozen=True)
class _Poll:
    """What every handler of a poll decision needs besides the row and the decision."""

    code: str | None  # the provider's code as read (or rules.NOT_FOUND)
    status_code: str | None  # normalised for storage
    now: datetime
    params: dict[str, Any]  # the statements' common parameters: id, code, now, reads


def _reschedule(conn: Conn, row: dict[str, Any], decision: rules.Decision, ctx: _Poll) -> Applied | None:
    """Still pending: record the read, poll again at the next step."""
    tx_id, common = row["id"], ctx.params
    done = conn.execute(
        """UPDATE transactions
              SET provider_status = COALESCE(%(code)s, provider_status),
                  last_polled_at = CASE WHEN %(reads)s > 0 THEN %(now)s ELSE last_polled_at END,
                  poll_count = poll_count + %(reads)s, poll_step = %(step)s,
                  next_poll_at = %(next)s, updated_at = %(now)s
            WHERE id = %(id)s AND status = %(status)s
        RETURNING id""",
        {**common, "step": decision.poll_step, "next": decision.next_poll_at, "status": row["status"]},
    ).fetchone()
    if done is None:
        return None
    assert decision.next_poll_at is not None
    schedule_poll(conn, tx_id, decision.next_poll_at)
    return Applied("reschedule")


def _complete(conn: Conn, row: dict[str, Any], decision: rules.Decision, ctx: _Poll) -> Applied | None:
    """The bank executed the payment."""
    common, status_code, now = ctx.params, ctx.status_code, ctx.now
    done = conn.execute(
        """UPDATE transactions
              SET status = 'completed', provider_status = %(code)s, failure_reason = NULL,
                  last_polled_at = %(now)s, poll_count = poll_count + %(reads)s,
                  next_poll_at = NULL, updated_at = %(now)s
            WHERE id = %(id)s AND status = 'processing'
        RETURNING poll_count""",
        common,
    ).fetchone()
    if done is None:
        return None
    notify(conn, row["user_id"], rules.NOTIFY_COMPLETED, rules.MESSAGES[rules.NOTIFY_COMPLETED])
    audit(conn, row, "payment_completed", {"provider_status": status_code, "amount": row["amount"]})
    return Applied("complete", "completed", (now - row["created_at"]).total_seconds(), done["poll_count"])


def _fail(conn: Conn, row: dict[str, Any], decision: rules.Decision, ctx: _Poll) -> Applied | None:
    """Rejected, cancelled or unknown at the bank: failed, the balance given back, the user told."""
    tx_id, common, status_code, now = row["id"], ctx.params, ctx.status_code, ctx.now
    reason = decision.failure_reason or rules.REASON_REJECTED
    done = conn.execute(
        """UPDATE transactions
              SET status = 'failed', failure_reason = %(reason)s,
                  provider_status = COALESCE(%(code)s, provider_status),
                  last_polled_at = %(now)s, poll_count = poll_count + %(reads)s,
                  next_poll_at = NULL, updated_at = %(now)s
            WHERE id = %(id)s AND status = 'processing'
        RETURNING poll_count""",
        {**common, "reason": reason},
    ).fetchone()
    if done is None:
        return None
    balance = restore_balance(conn, row, now)
    notify(conn, row["user_id"], rules.NOTIFY_FAILED, rules.MESSAGES[reason])
    audit(conn, row, "payment_failed", {"reason": reason, "provider_status": status_code,
                                        "amount": row["amount"], **balance})
    outcome = {rules.REASON_REJECTED: "rejected", rules.REASON_CANCELLED: "cancelled",
               rules.REASON_NOT_FOUND: "not_found"}.get(reason, "failed")
    alert = None
    if reason == rules.REASON_NOT_FOUND:
        alert = ("high", "Payment unknown at the provider",
                 f"Transaction {tx_id}: Neonomics answered 404 for its payment; marked failed "
                 f"({rules.REASON_NOT_FOUND}), user notified, balance restored: {balance['balance_restored']}.",
                 f"payment-not-found:{tx_id}", "payment-not-found")
    return Applied("fail", outcome, (now - row["created_at"]).total_seconds(), done["poll_count"], alert)


def _late_complete(conn: Conn, row: dict[str, Any], decision: rules.Decision, ctx: _Poll) -> Applied | None:
    """A payment failed by SCA timeout that the bank completed after all."""
    tx_id, common, status_code, now = row["id"], ctx.params, ctx.status_code, ctx.now
    done = conn.execute(
        """UPDATE transactions
              SET status = 'completed', provider_status = %(code)s, failure_reason = NULL,
                  completed_late_at = %(now)s, last_polled_at = %(now)s,
                  poll_count = poll_count + %(reads)s, next_poll_at = NULL, updated_at = %(now)s
            WHERE id = %(id)s AND status = 'failed' AND failure_reason = 'SCA_TIMEOUT'
        RETURNING id""",
        common,
    ).fetchone()
    if done is None:
        return None
    balance = redebit_balance(conn, row, now)
    notify(conn, row["user_id"], rules.NOTIFY_COMPLETED_LATE, rules.MESSAGES[rules.NOTIFY_COMPLETED_LATE])
    audit(conn, row, "payment_late_completion", {
        "provider_status": status_code, "amount": row["amount"],
        "timed_out_at": row["timed_out_at"].isoformat() if row["timed_out_at"] else None, **balance,
    })
    adjusted = "re-debited" if balance["balance_redebited"] else f"not changed ({balance['balance_note']})"
    alert = ("high", "Payment completed after SCA timeout",
             f"Transaction {tx_id} was failed by SCA timeout, but the bank now reports {status_code}: "
             f"it is marked completed (money moved). Cached balance {adjusted}. The user was told to "
             "retry; check for a duplicate payment.",
             f"payment-late-completion:{tx_id}", "payment-late-completion")
    return Applied("late_complete", "late_completion", alert=alert)


def _end_watch(conn: Conn, row: dict[str, Any], decision: rules.Decision, ctx: _Poll) -> Applied | None:
    """The 24 h watch of an SCA-timed-out payment ends (resolved or not)."""
    tx_id, common, status_code, code = row["id"], ctx.params, ctx.status_code, ctx.code
    done = conn.execute(
        """UPDATE transactions
              SET provider_status = COALESCE(%(code)s, provider_status),
                  last_polled_at = CASE WHEN %(reads)s > 0 THEN %(now)s ELSE last_polled_at END,
                  poll_count = poll_count + %(reads)s, next_poll_at = NULL, updated_at = %(now)s
            WHERE id = %(id)s AND status = 'failed' AND failure_reason = 'SCA_TIMEOUT'
        RETURNING id""",
        common,
    ).fetchone()
    if done is None:
        return None
    unresolved = decision.action is rules.Action.END_WATCH_UNRESOLVED
    audit(conn, row, "payment_watch_unresolved" if unresolved else "payment_watch_ended",
          {"provider_status": status_code, "not_found": code == rules.NOT_FOUND})
    alert = None
    if unresolved:
        alert = ("warning", "Payment still pending at the bank after 24 h",
                 f"Transaction {tx_id} was failed by SCA timeout and the bank still reports "
                 f"{status_code or 'no status'} after the 24 h watch. Drop stopped watching it.",
                 f"payment-watch-unresolved:{tx_id}", "payment-watch-unresolved")
    return Applied(decision.action.value, alert=alert)


_HANDLERS: dict[rules.Action, Callable[[Conn, dict[str, Any], rules.Decision, _Poll], Applied | None]] = {
    rules.Action.RESCHEDULE: _reschedule,
    rules.Action.COMPLETE: _complete,
    rules.Action.FAIL: _fail,
    rules.Action.LATE_COMPLETE: _late_complete,
    rules.Action.END_WATCH: _end_watch,
    rules.Action.END_WATCH_UNRESOLVED: _end_watch,
}


def after_commit(applied: Applied | None) -> None:
    """Metrics and on-call alerts, once the effects are committed."""
    if applied is None:
        return
    if applied.outcome is not None:
        PAYMENTS_FINAL.labels(applied.outcome).inc()
        if applied.outcome == "late_completion":
            LATE_COMPLETIONS.inc()
    if applied.seconds_to_final is not None:
        TIME_TO_FINAL.labels("completed" if applied.outcome == "completed" else "failed").observe(
            max(0.0, applied.seconds_to_final))
    if applied.polls is not None:
        POLLS_PER_PAYMENT.observe(applied.polls)
    if applied.alert is not None:
        severity, title, message, key, runbook = applied.alert
        try:
            send_alert(severity, title, message, key=key, runbook=runbook)
        except Exception:
            # The audit row is the durable record; a failed alert must not fail the job.
            log.exception("could not send alert %s", key)


# --- the poll: read without a lock, apply in one short transaction ------------------------------
#
# A poll (or a chunk of them) reads its transaction rows without locking them, asks the provider
# for every payment concurrently on the worker's event loop, and then applies all outcomes in one
# short transaction that locks the rows again and compares each with what was read: a payment
# that changed in between (a concurrent poll, the SCA expiry, a sweep's duplicate) is planned
# again on what is there now and, if it still needs one, read again. No PostgreSQL connection or
# row lock is held across a provider call, and the serial order of effects is what the row lock
# across the call used to give: a terminal status is never replaced, a duplicate changes nothing.

CHUNK_JOB = "pisp.poll_status_chunk"
# Provider reads of one run in flight at once (the loop's async client has 128 connections):
# INITIAL_WINDOW first, WINDOW_GROWTH more for each success (4, 16, 64, 100 per round trip).
READ_CONCURRENCY = 100
INITIAL_WINDOW = 4
WINDOW_GROWTH = 3
# A payment that changed between its read and the apply is read again, at most this many rounds
# in one run; after that (or while another job holds its row) it is busy and runs again shortly.
MAX_ROUNDS = 3
BUSY_DELAY_S = 1.0
# What a decision depends on: if any of it changed since the read, the read is not applied.
VERSION = ("status", "failure_reason", "next_poll_at", "timed_out_at", "poll_step", "poll_count", "payment_id")
_SKIPS = (rules.PollPlan.SKIP_FINAL, rules.PollPlan.SKIP_STALE)


def validate_poll_payload(transaction_id: object, due: object) -> None:
    """Reject a payload no retry can fix (dead letter). Messages name the field, never the value."""
    if not isinstance(transaction_id, str) or not transaction_id.strip() or len(transaction_id) > MAX_ID_LENGTH:
        raise PermanentError(f"{POLL_JOB}: invalid payload: transaction_id must be a non-empty string")
    if due is None or due == rules.UNSCHEDULED:
        return
    if not isinstance(due, str):
        raise PermanentError(f"{POLL_JOB}: invalid payload: due must be an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(due)
    except ValueError:
        raise PermanentError(f"{POLL_JOB}: invalid payload: due must be an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise PermanentError(f"{POLL_JOB}: invalid payload: due must carry a UTC offset")


def read_status(payment_id: str) -> tuple[str | None, ProviderPermanentError | None]:
    """One synchronous read (the SCA expiry's): (code, unusable-answer error). 404 → NOT_FOUND.
    Transient errors and an open circuit propagate; nothing has been written yet."""

    try:
        code = get_neonomics().get_payment_status(payment_id).transaction_status
    except NotFoundError:
        return _seen(rules.NOT_FOUND), None
    except CircuitOpenError:
        raise
    except ProviderPermanentError as exc:
        return None, exc
    return _seen(code), None


def _seen(code: str) -> str:
    """Count a status read (bounded labels) and say so once for a code outside the map."""
    label = "not_found" if code == rules.NOT_FOUND else rules.status_label(code)
    STATUS_SEEN.labels(label).inc()
    if label == "unknown":
        log.warning("payment status code %r is not in the status map; still processing", code[:8])
    return code


@dataclass(frozen=True)
class PollItem:
    """One poll to run: its payload (validated by poll_many), its outbox row and request id."""

    transaction_id: Any
    due: Any = None
    outbox_id: int | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class PollOutcome:
    """How one poll ended. `marked`: its outbox row was marked done with its effects. `error`: a
    dead letter's reason (the effects, if any, are committed), a transient error to retry, or the
    open circuit; `wait_ms`: run again after this long (breaker open, busy), no retry used."""

    result: str
    marked: bool = False
    error: BaseException | None = None
    wait_ms: int | None = None

    @property
    def dead(self) -> bool:
        return self.error is not None and self.wait_ms is None and not is_transient(self.error)

    @property
    def transient(self) -> bool:
        return self.error is not None and self.wait_ms is None and is_transient(self.error)


@dataclass(frozen=True)
class _Read:
    code: str | None = None  # the provider's code, NOT_FOUND, or None (nothing read, or unusable)
    reads: int = 0
    unusable: ProviderPermanentError | None = None  # applied (next poll in 5 min), then dead-lettered
    failed: BaseException | None = None  # nothing to apply: breaker open, transient, or a bug


def version(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c] for c in VERSION)


def poll_many(items: Sequence[PollItem], *, now: datetime | None = None) -> list[PollOutcome]:
    """Run these polls: one statement to load, the provider reads concurrently (bounded, the
    breaker admitted once while closed), one transaction to apply; returns each poll's outcome,
    in order. Nothing is raised for one poll: its error is in its outcome."""
    now = now or utcnow()
    outcomes: dict[int, PollOutcome] = {}
    todo: list[int] = []
    for i, item in enumerate(items):
        try:
            validate_poll_payload(item.transaction_id, item.due)
            todo.append(i)
        except PermanentError as exc:
            outcomes[i] = PollOutcome("invalid", error=exc)
    for _ in range(MAX_ROUNDS):
        if not todo:
            break
        todo = _poll_round(items, todo, now, outcomes)
    for i in todo:
        outcomes[i] = PollOutcome("busy", wait_ms=retry_delay_ms(BUSY_DELAY_S))
    for outcome in outcomes.values():
        if outcome.result != "invalid" and outcome.result != "not_found" and not outcome.transient:
            POLLS.labels(_poll_result_label(outcome)).inc()
    return [outcomes[i] for i in range(len(items))]


def _poll_round(items: Sequence[PollItem], todo: list[int], now: datetime,
                outcomes: dict[int, PollOutcome]) -> list[int]:
    """One load → read → apply pass over `todo`; returns the polls to run again (changed rows)."""
    with transaction() as conn:  # no lock: nothing is held while the provider answers
        rows = {r["id"]: r for r in conn.execute(f"SELECT {COLUMNS} FROM transactions WHERE id = ANY(%s)",
                                                  ([items[i].transaction_id for i in todo],)).fetchall()}
    plans: dict[int, rules.PollPlan] = {}
    for i in todo:
        row = rows.get(items[i].transaction_id)
        if row is None:
            outcomes[i] = PollOutcome("not_found", error=PermanentError(
                f"{POLL_JOB}: transaction {items[i].transaction_id} not found"))
        else:
            plans[i] = rules.plan_poll(state_of(row), items[i].due)
    to_read = [i for i, plan in plans.items()
               if plan not in _SKIPS and rows[items[i].transaction_id]["payment_id"]]
    read_of = dict(zip(to_read, _read_statuses(
        [(rows[items[i].transaction_id]["payment_id"], items[i].request_id) for i in to_read]), strict=True))
    for i, read in read_of.items():
        if read.failed is not None:
            del plans[i]
            if isinstance(read.failed, CircuitOpenError):
                outcomes[i] = PollOutcome("breaker_open", error=read.failed,
                                          wait_ms=retry_delay_ms(read.failed.retry_after_s))
            else:
                outcomes[i] = PollOutcome("read_failed", error=read.failed)
    applied, again = _apply(items, plans, rows, read_of, now, outcomes)
    for one in applied:
        after_commit(one)
    return again


def _read_statuses(requests: list[tuple[str, str | None]]) -> list[_Read]:
    return run_on_loop(_read_all(requests)) if requests else []


async def _read_all(requests: list[tuple[str, str | None]]) -> list[_Read]:
    client = get_async_neonomics()
    breaker = get_breaker(NEONOMICS_PISP)
    # One breaker admission for the run while it is closed, and a slow start: a few requests
    # first, more as they succeed. Once the run has seen as many transient failures as open the
    # breaker, every request not yet sent asks the breaker itself (refused while it is open), so
    # a failing provider gets about what the one-request-per-thread path sent it, not a batch.
    admitted = client.admit_many(NEONOMICS_PISP)
    gate = asyncio.Semaphore(INITIAL_WINDOW)
    window, failures = [INITIAL_WINDOW], [0]

    async def one(payment_id: str, rid: str | None) -> _Read:
        async with gate:
            try:
                status = await client.get_payment_status(payment_id, request_id=rid,
                                                         admitted=admitted and failures[0] < breaker.fail_max)
            except NotFoundError:
                return _Read(_seen(rules.NOT_FOUND), 1)
            except ProviderPermanentError as exc:
                return _Read(None, 1, unusable=exc)
            except Exception as exc:  # breaker open, 5xx, timeout (retried); anything else dead-letters
                if not isinstance(exc, CircuitOpenError):
                    failures[0] += 1
                return _Read(failed=exc)
            grow = min(WINDOW_GROWTH, READ_CONCURRENCY - window[0])
            window[0] += grow
            for _ in range(grow):
                gate.release()
        return _Read(_seen(status.transaction_status), 1)

    return list(await asyncio.gather(*(one(p, r) for p, r in requests)))


def _apply(items: Sequence[PollItem], plans: dict[int, rules.PollPlan], rows: dict[str, dict[str, Any]],
           read_of: dict[int, _Read], now: datetime,
           outcomes: dict[int, PollOutcome]) -> tuple[list[Applied], list[int]]:
    """Every planned poll's outcome in one transaction; returns what was applied (metrics and
    alerts after the commit) and the polls whose row changed since the read (to run again)."""
    applied: list[Applied] = []
    again: list[int] = []
    if not plans:
        return applied, again
    settled: dict[int, PollOutcome] = {}
    with transaction() as conn:
        # The balance restore may wait for a balance sync holding the account row.
        conn.execute(f"SET LOCAL lock_timeout = {int(ACCOUNT_LOCK_TIMEOUT_MS)}")
        mine = [o for i in plans if (o := items[i].outbox_id) is not None]
        # Outbox rows another run of the same poll already finished: that run's effects stand.
        open_rows = {r["id"] for r in outbox.pending_rows(conn, mine, POLL_JOB)} if mine else set()
        fresh = _lock_rows(conn, sorted({items[i].transaction_id for i, p in plans.items() if p not in _SKIPS}))
        touched: set[str] = set()
        for i, plan in plans.items():
            item = items[i]
            if item.outbox_id is not None and item.outbox_id not in open_rows:
                settled[i] = PollOutcome("duplicate", marked=True)
                continue
            if plan in _SKIPS:
                settled[i] = PollOutcome(plan.value, marked=True)
                continue
            row = fresh.get(item.transaction_id)
            if row is None:
                settled[i] = PollOutcome("busy", wait_ms=retry_delay_ms(BUSY_DELAY_S))
                continue
            if item.transaction_id in touched or version(row) != version(rows[item.transaction_id]):
                # Changed since the read (or by an earlier poll of this run): plan again on what is there.
                replan = rules.plan_poll(state_of(row), item.due)
                if replan in _SKIPS and item.transaction_id not in touched:
                    settled[i] = PollOutcome(replan.value, marked=True)
                else:
                    again.append(i)
                continue
            touched.add(item.transaction_id)
            read = read_of.get(i, _Read())  # no payment id yet: nothing was read
            decision = rules.decide_poll(plan, state_of(row), read.code, now, adhoc=item.due is None,
                                         error=read.unusable is not None)
            with using_request_id(item.request_id):
                done = apply_decision(conn, row, decision, read.code, now, reads=read.reads)
                if read.unusable is not None and done is not None:
                    error = read.unusable
                    audit(conn, row, "payment_poll_error", {"error": type(error).__name__, "status": error.status,
                                                            "codes": list(error.codes)})
            if done is not None:
                applied.append(done)
            settled[i] = PollOutcome(done.action if done else "unchanged", marked=True, error=read.unusable)
        outbox.mark_done_many(conn, [x for i, o in settled.items()
                                     if o.marked and o.result != "duplicate" and (x := items[i].outbox_id) is not None])
    outcomes.update(settled)
    return applied, again


def _lock_rows(conn: Conn, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The rows, locked in id order (two runs never deadlock). A row another job keeps locked for
    longer than LOCK_TIMEOUT_MS (the SCA expiry during its provider call) is left out: busy."""
    if not ids:
        return {}
    sql = f"SELECT {COLUMNS} FROM transactions WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
    conn.execute(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT_MS)}")
    try:
        with conn.transaction():  # a savepoint: a lock timeout does not poison the apply
            rows = conn.execute(sql, (ids,)).fetchall()
    except psycopg.errors.LockNotAvailable:
        rows = conn.execute(sql + " SKIP LOCKED", (ids,)).fetchall()
    finally:
        conn.execute(f"SET LOCAL lock_timeout = {int(ACCOUNT_LOCK_TIMEOUT_MS)}")
    return {r["id"]: r for r in rows}


def poll_payment(transaction_id: str, *, due: str | None = None, now: datetime | None = None) -> str:
    """One poll of one payment; returns what happened (reschedule, complete, fail, skip_stale…).

    Raises CircuitOpenError (breaker open: nothing written), PaymentBusy, transient provider
    errors (retried), PermanentError for an unknown transaction, and, after committing a
    slower next poll, the provider's permanent error for an unusable answer (dead letter)."""
    [outcome] = poll_many([PollItem(transaction_id, due, current_outbox_id(), request_id())], now=now)
    if outcome.marked:
        note_outbox_done()  # marked in the committed apply: no second transaction
    if outcome.result == "busy":
        raise PaymentBusy(transaction_id)
    if outcome.error is not None:
        raise outcome.error  # e.g. a dead letter with the reason; the next poll is already scheduled (5 min)
    return outcome.result


def _poll_result_label(outcome: PollOutcome) -> str:
    if isinstance(outcome.error, ProviderPermanentError):
        return "error"
    return {"reschedule": "pending", "complete": "completed", "fail": "failed"}.get(outcome.result, outcome.result)


def retry_delay_ms(retry_after_s: float) -> int:
    """Wait out the open circuit, plus jitter so the waiting polls do not all arrive at once."""
    return int(max(retry_after_s, 1.0) * 1000 + random.uniform(100, 1000))


@registry.job(POLL_JOB, queue="pisp", time_limit=90_000, traces_share=HIGH_VOLUME_TRACES, chunk_with=CHUNK_JOB)
def poll_status(transaction_id: str, due: str | None = None) -> RunLater | None:
    """Payload `{transaction_id}` (SCA callback, ad hoc) or `{transaction_id, due}` (scheduled)."""
    try:
        poll_payment(transaction_id, due=due)
    except CircuitOpenError as exc:
        # After the open period, without using the 3 transient retries.
        return RunLater(retry_delay_ms(exc.retry_after_s), f"circuit {exc.breaker} open")
    except PaymentBusy:
        return RunLater(retry_delay_ms(BUSY_DELAY_S), "payment busy")
    return None


# --- many polls per message (the relay's chunks) -----------------------------------------------



def process_chunk(outbox_ids: object, *, now: datetime | None = None) -> RunLater | None:
    """The polls of these outbox rows in one run (poll_many); each ends as if it had run alone.

    Done polls are marked with their effects. A dead letter (unknown transaction, bad payload,
    unusable answer) is recorded for that poll alone, with its outbox row. Breaker open or a busy
    payment → the chunk runs again later (RunLater) for the rows still open; a transient error →
    the chunk is retried by Dramatiq's policy for those rows, and once its retries are spent they
    are dead-lettered, each alone, as a single poll would be. A crash before the apply's commit
    leaves every row as it was; the redelivered chunk leaves out the rows already done."""
    ids = chunk_outbox_ids(outbox_ids)
    with transaction() as conn:
        rows = outbox.pending_rows(conn, ids, POLL_JOB, lock=False)
    items, alone = [], []
    for row in rows:
        payload = row["payload"]
        if isinstance(payload, dict) and set(payload) <= {"transaction_id", "due"}:
            items.append(PollItem(payload.get("transaction_id"), payload.get("due"), row["id"],
                                  request_id_for(row["idempotency_key"])))
        else:
            alone.append(row)  # its own message refuses it exactly as before chunks existed
    _run_alone(alone)
    try:
        outcomes = poll_many(items, now=now)
    except Exception as exc:
        if should_retry(attempts_so_far(), exc):
            raise
        # A chunk that cannot commit for good: every row runs alone, each to its own outcome.
        log.warning("pisp chunk of %d polls failed (%s); they run one by one", len(items), type(exc).__name__)
        with transaction() as conn:
            _run_alone(outbox.pending_rows(conn, [o for i in items if (o := i.outbox_id) is not None], POLL_JOB,
                                            lock=False))
        return None
    waits = [o.wait_ms for o in outcomes if o.wait_ms is not None]
    retry = [(item, o) for item, o in zip(items, outcomes, strict=True) if o.transient]
    spent = bool(retry) and not waits and not should_retry(attempts_so_far(), retry[0][1].error or Exception())
    for item, outcome in zip(items, outcomes, strict=True):
        if outcome.dead or (spent and outcome.transient):
            dead_letter_job(POLL_JOB, "pisp", _kwargs(item), outcome.error or Exception(), outbox_id=item.outbox_id)
    if waits:
        # Breaker open or busy: the open rows (transient ones too) wait together, no retry used.
        return RunLater(max(waits), f"{len(waits)} of {len(items)} polls must wait")
    if retry and not spent:
        raise retry[0][1].error or RuntimeError("transient")  # Dramatiq's backoff; done rows are left out
    log.debug("pisp chunk: %d polls, %d alone", len(items), len(alone))
    return None


def _kwargs(item: PollItem) -> dict[str, Any]:
    return {"transaction_id": item.transaction_id, **({"due": item.due} if item.due is not None else {})}


def _run_alone(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    broker = dramatiq_redis.global_broker()
    actor = broker.get_actor(POLL_JOB)
    for row in rows:
        payload = row["payload"] if isinstance(row["payload"], dict) else {}
        broker.enqueue(job_message(actor, payload, row["id"], row["idempotency_key"]))


@registry.job(CHUNK_JOB, queue="pisp", time_limit=120_000, traces_share=HIGH_VOLUME_TRACES)
def poll_status_chunk(outbox_ids: list[int]) -> RunLater | None:
    """`{outbox_ids}`: the relay's chunk of due `pisp.poll_status` rows (internal; callers and
    pisp.sweep always enqueue one `pisp.poll_status` row per poll)."""
    return process_chunk(outbox_ids)


# --- the sweep -----------------------------------------------------------------------------------


def sweep(now: datetime | None = None, *, slot: str | None = None, limit: int = SWEEP_LIMIT) -> int:
    """Enqueue a poll for every payment whose poll is overdue; return how many were enqueued.

    Idempotency key per transaction and sweep slot: a repeated sweep of the same slot adds
    nothing, the next slot may add one more (if the poll is still overdue)."""

    now = now or utcnow()
    tag = slot or now.replace(second=0, microsecond=0).isoformat()
    cutoff = rules.sweep_cutoff(now)
    enqueued = 0
    with transaction() as conn:
        rows = conn.execute(
            """SELECT id, next_poll_at FROM transactions
                WHERE (next_poll_at <= %(cutoff)s AND status IN ('processing', 'failed'))
                   OR (next_poll_at IS NULL AND status = 'processing' AND created_at <= %(cutoff)s)
                ORDER BY next_poll_at NULLS FIRST
                LIMIT %(limit)s""",
            {"cutoff": cutoff, "limit": limit},
        ).fetchall()
        for row in rows:
            due = row["next_poll_at"].isoformat() if row["next_poll_at"] else rules.UNSCHEDULED
            if jobs.enqueue_internal(POLL_JOB, {"transaction_id": row["id"], "due": due},
                                     key=f"{POLL_JOB}:{row['id']}:sweep:{tag}", conn=conn)[1]:
                enqueued += 1
        mark_outbox_done(conn)
    if enqueued:
        log.info("pisp.sweep re-enqueued %d overdue payment polls", enqueued)
    return enqueued


@registry.job(SWEEP_JOB, queue="pisp", time_limit=60_000)
def sweep_job(slot: str | None = None) -> None:
    sweep(slot=slot)
