"""The payment saga's domain rules, as pure functions (no I/O, time passed in).

`jobs.pisp` (status polling, late completion) and `jobs.sca` (SCA timeout expiry) load a
transaction, ask these functions what to do, and apply the answer in one PostgreSQL
transaction. Keeping the rules here means they are unit-tested without a database, a broker or
a clock (tests/jobs/test_payment_rules.py).

Status map (docs/payments.md, Berlin Group NextGenPSD2 `transactionStatus`):
ACCP, ACSP, ACSC, ACCC, ACWC → completed (docs/payments.md completes on ACCP);
RJCT, CANC → failed; RCVD, PDNG, ACTC, ACFC, PATC, PART and any unknown code → pending.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

COMPLETED_CODES = frozenset({"ACCP", "ACSP", "ACSC", "ACCC", "ACWC"})
FAILED_CODES = frozenset({"RJCT", "CANC"})
PENDING_CODES = frozenset({"RCVD", "PDNG", "ACTC", "ACFC", "PATC", "PART"})
KNOWN_CODES = COMPLETED_CODES | FAILED_CODES | PENDING_CODES

# failure_reason values written to transactions (a contract with the web tier).
REASON_REJECTED = "REJECTED_BY_BANK"  # RJCT
REASON_CANCELLED = "CANCELLED_AT_BANK"  # CANC seen by a normal poll (before the SCA deadline)
REASON_SCA_TIMEOUT = "SCA_TIMEOUT"
REASON_NOT_FOUND = "PAYMENT_NOT_FOUND"  # the provider answered 404 for our payment id

# Notification kinds and their Norwegian texts (the web tier shows `message` as is).
NOTIFY_COMPLETED = "payment_completed"
NOTIFY_FAILED = "payment_failed"
NOTIFY_SCA_TIMEOUT = "payment_sca_timeout"
NOTIFY_COMPLETED_LATE = "payment_completed_late"
MESSAGES = {
    NOTIFY_COMPLETED: "Betalingen er gjennomført.",
    REASON_REJECTED: "Betalingen ble avvist av banken. Vennligst prøv igjen.",
    REASON_CANCELLED: "Betalingen ble avbrutt. Vennligst prøv igjen.",
    REASON_NOT_FOUND: "Betalingen kunne ikke gjennomføres. Vennligst prøv igjen.",
    REASON_SCA_TIMEOUT: "Betalingen ble ikke bekreftet i tide. Vennligst prøv igjen.",
    NOTIFY_COMPLETED_LATE: (
        "Betalingen ble likevel gjennomført av banken etter at fristen gikk ut. "
        "Sjekk kontoen din før du prøver på nytt."
    ),
}

# Polling a payment that is still pending: fast first (the user is waiting after the SCA
# redirect), then capped at 60 s. With the sweep's grace (below) a status change is seen within
# 60 s normally and within ~3.5 min after a lost message: inside the 5-minute PISP lag budget.
POLL_DELAYS_S = (2, 4, 8, 16, 32, 60)
# A payment failed by SCA timeout is watched for a late success at the bank for 24 h: 1 min
# (our own cancellation shows up as CANC and ends the watch), then doubling up to 30 min
# (~55 polls per watched payment).
WATCH_DELAYS_S = (60, 120, 240, 480, 960, 1800)
WATCH_WINDOW = timedelta(hours=24)
# A poll that got an answer we cannot use (malformed, 4xx) is dead-lettered; the next try waits
# this long so a provider returning garbage costs one dead letter per 5 min, not per minute.
POLL_ERROR_DELAY = timedelta(minutes=5)
# The sweep re-enqueues a poll this long after it was due. Longer than the breaker's open period
# (60 s), so a poll that is waiting out an open circuit (dramatiq.Retry) is not doubled.
SWEEP_GRACE = timedelta(seconds=90)
# `due` value in a poll payload for a processing payment that has no next_poll_at.
UNSCHEDULED = "unscheduled"


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    PENDING = "pending"


def normalise_code(code: str | None) -> str | None:
    if code is None:
        return None
    code = code.strip().upper()
    return code or None


def map_status(code: str | None) -> Outcome:
    """Berlin Group code → what it means for the transaction. Unknown codes keep polling."""
    code = normalise_code(code)
    if code in COMPLETED_CODES:
        return Outcome.COMPLETED
    if code in FAILED_CODES:
        return Outcome.FAILED
    return Outcome.PENDING


def status_label(code: str | None) -> str:
    """A bounded metric label: the code if we know it, else `unknown` (never free text)."""
    code = normalise_code(code)
    return code if code in KNOWN_CODES else "unknown"


def failure_reason_for(code: str) -> str:
    return REASON_CANCELLED if normalise_code(code) == "CANC" else REASON_REJECTED


def next_poll_delay(step: int) -> timedelta:
    """Delay before poll number `step`+1 of a pending payment: 2, 4, 8, 16, 32, 60, 60 … s."""
    return timedelta(seconds=POLL_DELAYS_S[min(max(step, 0), len(POLL_DELAYS_S) - 1)])


def next_watch_delay(step: int) -> timedelta:
    """Delay between late-completion checks: 1, 2, 4, 8, 16, 30, 30 … min."""
    return timedelta(seconds=WATCH_DELAYS_S[min(max(step, 0), len(WATCH_DELAYS_S) - 1)])


def sca_deadline(created_at: datetime, timeout_s: int) -> datetime:
    return created_at + timedelta(seconds=timeout_s)


def expiry_cutoff(now: datetime, timeout_s: int) -> datetime:
    """Payments created at or before this instant are past their SCA deadline."""
    return now - timedelta(seconds=timeout_s)


def watch_ends_at(timed_out_at: datetime) -> datetime:
    return timed_out_at + WATCH_WINDOW


def sweep_cutoff(now: datetime) -> datetime:
    """Polls due at or before this instant are overdue (their message was lost)."""
    return now - SWEEP_GRACE


# --- which poll may run -------------------------------------------------------------------


@dataclass(frozen=True)
class PaymentState:
    """What the rules need to know about a transaction row."""

    status: str  # processing | completed | failed
    failure_reason: str | None
    next_poll_at: datetime | None
    timed_out_at: datetime | None
    poll_step: int = 0
    has_payment_id: bool = True

    @property
    def watched(self) -> bool:
        """Failed by SCA timeout and still watched for a late success."""
        return (
            self.status == "failed"
            and self.failure_reason == REASON_SCA_TIMEOUT
            and self.next_poll_at is not None
            and self.timed_out_at is not None
        )


class PollPlan(enum.StrEnum):
    POLL = "poll"  # processing: ask the provider
    WATCH = "watch"  # failed by SCA timeout, still watched: ask the provider
    SKIP_FINAL = "skip_final"  # nothing to do: final and not watched
    SKIP_STALE = "skip_stale"  # this message's due time was superseded (another poll owns the schedule)


def due_matches(next_poll_at: datetime | None, due: str) -> bool:
    """Does a poll scheduled for `due` still own the schedule (next_poll_at unchanged)?"""
    if due == UNSCHEDULED:
        return next_poll_at is None
    if next_poll_at is None:
        return False
    return datetime.fromisoformat(due) == next_poll_at


def plan_poll(state: PaymentState, due: str | None) -> PollPlan:
    """`due` None is an ad-hoc poll (SCA callback): always runs. A scheduled poll (`due` set)
    runs only while the schedule it was made for is still current, so duplicates (sweep and
    chain, relay redelivery, concurrent callbacks) never fork the polling into two chains."""
    if state.status == "processing":
        kind = PollPlan.POLL
    elif state.watched:
        kind = PollPlan.WATCH
    else:
        return PollPlan.SKIP_FINAL
    if due is not None and not due_matches(state.next_poll_at, due):
        return PollPlan.SKIP_STALE
    return kind


# --- what a poll result means --------------------------------------------------------------


class Action(enum.StrEnum):
    COMPLETE = "complete"  # processing → completed
    FAIL = "fail"  # processing → failed (reason), balance restored per rule
    RESCHEDULE = "reschedule"  # still pending: next poll at `next_poll_at`
    LATE_COMPLETE = "late_complete"  # failed (SCA_TIMEOUT) → completed, balance re-debited, alert
    END_WATCH = "end_watch"  # the bank confirmed the failure (RJCT/CANC/404): stop watching
    END_WATCH_UNRESOLVED = "end_watch_unresolved"  # 24 h passed and the bank still says pending


@dataclass(frozen=True)
class Decision:
    action: Action
    failure_reason: str | None = None
    next_poll_at: datetime | None = None
    poll_step: int = 0


NOT_FOUND = "__not_found__"  # poll result sentinel: the provider answered 404


def decide_poll(
    plan: PollPlan,
    state: PaymentState,
    code: str | None,
    now: datetime,
    *,
    adhoc: bool = False,
    error: bool = False,
) -> Decision:
    """What to do after a poll. `code` is the provider's status (None: no payment id yet or no
    usable answer, NOT_FOUND: 404); `adhoc` restarts the fast backoff (the user just came back
    from SCA); `error` means the answer was unusable and the message will be dead-lettered."""
    if plan is PollPlan.POLL:
        if code == NOT_FOUND:
            return Decision(Action.FAIL, failure_reason=REASON_NOT_FOUND)
        outcome = map_status(code) if code is not None else Outcome.PENDING
        if outcome is Outcome.COMPLETED:
            return Decision(Action.COMPLETE)
        if outcome is Outcome.FAILED:
            return Decision(Action.FAIL, failure_reason=failure_reason_for(code or ""))
        if error:
            return Decision(Action.RESCHEDULE, next_poll_at=now + POLL_ERROR_DELAY, poll_step=state.poll_step)
        step = 0 if adhoc else state.poll_step
        return Decision(Action.RESCHEDULE, next_poll_at=now + next_poll_delay(step), poll_step=step + 1)
    if plan is PollPlan.WATCH:
        assert state.timed_out_at is not None
        end = watch_ends_at(state.timed_out_at)
        if code == NOT_FOUND:
            return Decision(Action.END_WATCH)
        outcome = map_status(code) if code is not None else Outcome.PENDING
        if outcome is Outcome.COMPLETED:
            return Decision(Action.LATE_COMPLETE)
        if outcome is Outcome.FAILED:
            return Decision(Action.END_WATCH)
        if now >= end:
            return Decision(Action.END_WATCH_UNRESOLVED)
        delay = POLL_ERROR_DELAY if error else next_watch_delay(state.poll_step)
        # The last check lands exactly at the end of the window.
        return Decision(Action.RESCHEDULE, next_poll_at=min(now + delay, end), poll_step=state.poll_step + 1)
    raise ValueError(f"nothing to decide for plan {plan}")


# --- SCA timeout expiry --------------------------------------------------------------------


class Cancellation(enum.StrEnum):
    """What happened when the expiry tried to cancel the payment at the provider."""

    CANCELLED = "cancelled"  # 204 / CANC
    ALREADY_CANCELLED = "already_cancelled"  # the status read said CANC (bank expired it, or our earlier try)
    NEEDS_AUTHORISATION = "needs_authorisation"  # 202: the bank wants the user to confirm the cancel
    REFUSED = "refused"  # 4xx, e.g. 400 CANCELLATION_INVALID (the payment may have become final)
    UNREACHABLE = "unreachable"  # 5xx/timeout/breaker open: expire anyway, keep watching
    NOT_FOUND = "not_found"  # 404 on cancel
    NO_PAYMENT_ID = "no_payment_id"  # initiation never recorded a provider payment id


class ExpiryAction(enum.StrEnum):
    APPLY_STATUS = "apply_status"  # the bank's final status wins (completed, or rejected)
    CANCEL = "cancel"  # not final: cancel at the provider, then expire
    EXPIRE = "expire"  # fail with SCA_TIMEOUT now


def decide_expiry_after_status(code: str | None, *, reachable: bool, has_payment_id: bool) -> ExpiryAction:
    """First step of the expiry: a final status seen now wins (a payment the bank accepted is
    never failed). CANC at this point is the SCA timeout itself (the bank's or ours from a run
    that crashed before committing), so it expires as SCA_TIMEOUT: a rerun gives the same result."""
    if not has_payment_id or not reachable:
        return ExpiryAction.EXPIRE
    if code == NOT_FOUND:
        return ExpiryAction.APPLY_STATUS
    code = normalise_code(code)
    if code == "CANC":
        return ExpiryAction.EXPIRE
    if code is not None and map_status(code) is not Outcome.PENDING:
        return ExpiryAction.APPLY_STATUS
    return ExpiryAction.CANCEL


def watch_after_expiry(cancellation: Cancellation) -> bool:
    """Keep watching for a late success unless there is no payment at the provider to watch."""
    return cancellation not in (Cancellation.NO_PAYMENT_ID, Cancellation.NOT_FOUND)


# --- the cached balance --------------------------------------------------------------------


def should_restore_balance(
    *,
    balance: int | None,
    balance_synced_at: datetime | None,
    account_currency: str,
    payment_created_at: datetime,
    payment_currency: str,
) -> tuple[bool, str]:
    """Give the amount back to the cached balance of a failed payment?

    The web tier debits the cached balance when it creates the payment. Only a balance synced
    *before* the payment still carries that debit; a newer sync already shows the bank's truth
    (the bank never moved the money). Returns (restore?, reason) for the audit row.
    """
    if balance is None:
        return False, "no_cached_balance"
    if account_currency != payment_currency:
        return False, "currency_mismatch"
    if balance_synced_at is not None and balance_synced_at >= payment_created_at:
        return False, "synced_after_payment"
    return True, "restored"


def should_redebit_balance(
    *,
    balance: int | None,
    balance_synced_at: datetime | None,
    restored_at: datetime | None,
) -> tuple[bool, str]:
    """A late completion takes back what the expiry restored, once, and only while the cached
    balance still carries that restore (a sync after the restore already shows the bank's truth)."""
    if restored_at is None:
        return False, "nothing_restored"
    if balance is None:
        return False, "no_cached_balance"
    if balance_synced_at is not None and balance_synced_at >= restored_at:
        return False, "synced_after_restore"
    return True, "redebited"
