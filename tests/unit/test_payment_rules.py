"""The payment saga's pure rules (jobs.payments): no database, no broker, time passed in."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs import payments as rules
from jobs.payments import Action, Cancellation, ExpiryAction, Outcome, PaymentState, PollPlan

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("code", ["ACCP", "ACSP", "ACSC", "ACCC", "ACWC"])
def test_completed_codes(code):
    assert rules.map_status(code) is Outcome.COMPLETED
    assert rules.map_status(code.lower()) is Outcome.COMPLETED


@pytest.mark.parametrize("code", ["RJCT", "CANC"])
def test_failed_codes(code):
    assert rules.map_status(code) is Outcome.FAILED


@pytest.mark.parametrize("code", ["RCVD", "PDNG", "ACTC", "ACFC", "PATC", "PART", "XXXX", "ACSX", "", None])
def test_pending_and_unknown_codes_keep_polling(code):
    assert rules.map_status(code) is Outcome.PENDING


def test_status_label_is_bounded():
    assert rules.status_label("ACCP") == "ACCP"
    assert rules.status_label("NEWCODE") == "unknown"
    assert rules.status_label(None) == "unknown"


def test_failure_reasons():
    assert rules.failure_reason_for("RJCT") == rules.REASON_REJECTED
    assert rules.failure_reason_for("CANC") == rules.REASON_CANCELLED


def test_every_reason_has_a_norwegian_message():
    for key in (rules.REASON_REJECTED, rules.REASON_CANCELLED, rules.REASON_NOT_FOUND, rules.REASON_SCA_TIMEOUT,
                rules.NOTIFY_COMPLETED, rules.NOTIFY_COMPLETED_LATE):
        assert rules.MESSAGES[key]
    assert rules.MESSAGES[rules.REASON_SCA_TIMEOUT] == "Betalingen ble ikke bekreftet i tide. Vennligst prøv igjen."


def test_poll_backoff_is_fast_first_and_capped():
    delays = [rules.next_poll_delay(step).total_seconds() for step in range(10)]
    assert delays[:6] == [2, 4, 8, 16, 32, 60]
    assert max(delays) == 60
    assert rules.next_poll_delay(-1).total_seconds() == 2


def test_poll_schedule_keeps_the_5_minute_lag_budget():
    # Worst case: the status changes right after a poll at the cap; the next poll's message is
    # lost with Redis; the sweep runs every 60 s and waits SWEEP_GRACE before re-enqueueing.
    worst = max(rules.POLL_DELAYS_S) + rules.SWEEP_GRACE.total_seconds() + 60
    assert worst < 300


def test_polls_before_the_sca_deadline_are_few():
    elapsed, polls = 0, 0
    while elapsed < 300:
        elapsed += rules.next_poll_delay(polls).total_seconds()
        polls += 1
    assert polls <= 12


def test_watch_backoff_and_window():
    assert [rules.next_watch_delay(s).total_seconds() for s in range(7)] == [60, 120, 240, 480, 960, 1800, 1800]
    assert rules.watch_ends_at(T0) == T0 + timedelta(hours=24)


def test_deadline_and_cutoff_agree():
    created = T0
    assert rules.sca_deadline(created, 300) == T0 + timedelta(seconds=300)
    assert rules.expiry_cutoff(T0 + timedelta(seconds=300), 300) >= created  # at the deadline: due
    assert rules.expiry_cutoff(T0 + timedelta(seconds=299), 300) < created  # before: not due


def state(status="processing", **kw) -> PaymentState:
    base = {"failure_reason": None, "next_poll_at": T0, "timed_out_at": None, "poll_step": 0}
    base.update(kw)
    return PaymentState(status=status, **base)


def test_plan_poll():
    assert rules.plan_poll(state(), None) is PollPlan.POLL
    assert rules.plan_poll(state(), T0.isoformat()) is PollPlan.POLL
    assert rules.plan_poll(state(), (T0 + timedelta(seconds=1)).isoformat()) is PollPlan.SKIP_STALE
    assert rules.plan_poll(state(next_poll_at=None), rules.UNSCHEDULED) is PollPlan.POLL
    assert rules.plan_poll(state(), rules.UNSCHEDULED) is PollPlan.SKIP_STALE
    assert rules.plan_poll(state("completed", next_poll_at=None), None) is PollPlan.SKIP_FINAL
    assert rules.plan_poll(state("failed", failure_reason="REJECTED_BY_BANK", next_poll_at=None), None) \
        is PollPlan.SKIP_FINAL
    watched = state("failed", failure_reason="SCA_TIMEOUT", timed_out_at=T0, next_poll_at=T0 + timedelta(minutes=1))
    assert rules.plan_poll(watched, None) is PollPlan.WATCH
    assert rules.plan_poll(watched, (T0 + timedelta(minutes=1)).isoformat()) is PollPlan.WATCH
    assert rules.plan_poll(watched, T0.isoformat()) is PollPlan.SKIP_STALE
    unwatched = state("failed", failure_reason="SCA_TIMEOUT", timed_out_at=T0, next_poll_at=None)
    assert rules.plan_poll(unwatched, None) is PollPlan.SKIP_FINAL


def test_due_matches_across_time_zones():
    oslo = T0.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Oslo"))
    assert rules.due_matches(T0, oslo.isoformat())


def test_decide_poll_processing():
    now = T0
    assert rules.decide_poll(PollPlan.POLL, state(), "ACCP", now).action is Action.COMPLETE
    fail = rules.decide_poll(PollPlan.POLL, state(), "RJCT", now)
    assert (fail.action, fail.failure_reason) == (Action.FAIL, rules.REASON_REJECTED)
    assert rules.decide_poll(PollPlan.POLL, state(), "CANC", now).failure_reason == rules.REASON_CANCELLED
    nf = rules.decide_poll(PollPlan.POLL, state(), rules.NOT_FOUND, now)
    assert (nf.action, nf.failure_reason) == (Action.FAIL, rules.REASON_NOT_FOUND)
    pending = rules.decide_poll(PollPlan.POLL, state(poll_step=3), "ACTC", now)
    assert pending == rules.Decision(Action.RESCHEDULE, next_poll_at=now + timedelta(seconds=16), poll_step=4)
    # The SCA callback (ad hoc) restarts the fast backoff.
    callback = rules.decide_poll(PollPlan.POLL, state(poll_step=5), "ACTC", now, adhoc=True)
    assert callback.next_poll_at == now + timedelta(seconds=2) and callback.poll_step == 1
    # No payment id yet: keep the schedule going.
    assert rules.decide_poll(PollPlan.POLL, state(), None, now).action is Action.RESCHEDULE
    # An unusable answer: try again in 5 minutes, backoff position kept.
    err = rules.decide_poll(PollPlan.POLL, state(poll_step=2), None, now, error=True)
    assert err.next_poll_at == now + rules.POLL_ERROR_DELAY and err.poll_step == 2


def test_decide_poll_watch():
    watched = state("failed", failure_reason="SCA_TIMEOUT", timed_out_at=T0, next_poll_at=T0, poll_step=1)
    now = T0 + timedelta(minutes=2)
    assert rules.decide_poll(PollPlan.WATCH, watched, "ACSC", now).action is Action.LATE_COMPLETE
    assert rules.decide_poll(PollPlan.WATCH, watched, "ACCP", now).action is Action.LATE_COMPLETE
    assert rules.decide_poll(PollPlan.WATCH, watched, "CANC", now).action is Action.END_WATCH
    assert rules.decide_poll(PollPlan.WATCH, watched, "RJCT", now).action is Action.END_WATCH
    assert rules.decide_poll(PollPlan.WATCH, watched, rules.NOT_FOUND, now).action is Action.END_WATCH
    again = rules.decide_poll(PollPlan.WATCH, watched, "ACTC", now)
    assert again.action is Action.RESCHEDULE and again.next_poll_at == now + timedelta(minutes=2)
    # Near the end of the window the last check lands exactly at its end; after it, stop.
    late = T0 + timedelta(hours=23, minutes=59)
    last = rules.decide_poll(PollPlan.WATCH, watched, "ACTC", late)
    assert last.next_poll_at == T0 + timedelta(hours=24)
    end = rules.decide_poll(PollPlan.WATCH, watched, "ACTC", T0 + timedelta(hours=24))
    assert end.action is Action.END_WATCH_UNRESOLVED
    # A late success is applied even at the very end of the window.
    assert rules.decide_poll(PollPlan.WATCH, watched, "ACSC", T0 + timedelta(hours=24)).action is Action.LATE_COMPLETE


def test_decide_poll_refuses_skip_plans():
    with pytest.raises(ValueError):
        rules.decide_poll(PollPlan.SKIP_STALE, state(), "ACCP", T0)


@given(st.text(min_size=0, max_size=8))
def test_any_code_gives_exactly_one_known_action(code):
    action = rules.decide_poll(PollPlan.POLL, state(), code, T0).action
    assert action in (Action.COMPLETE, Action.FAIL, Action.RESCHEDULE)
    assert (action is Action.COMPLETE) == (code.strip().upper() in rules.COMPLETED_CODES)
    assert (action is Action.FAIL) == (code.strip().upper() in rules.FAILED_CODES)


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=86_400 * 2))
def test_watch_never_schedules_past_its_window(step, seconds):
    watched = state("failed", failure_reason="SCA_TIMEOUT", timed_out_at=T0, next_poll_at=T0, poll_step=step)
    now = T0 + timedelta(seconds=seconds)
    d = rules.decide_poll(PollPlan.WATCH, watched, "PDNG", now)
    if d.action is Action.RESCHEDULE:
        assert now < d.next_poll_at <= T0 + rules.WATCH_WINDOW
    else:
        assert d.action is Action.END_WATCH_UNRESOLVED and now >= T0 + rules.WATCH_WINDOW


def test_decide_expiry_after_status():
    f = rules.decide_expiry_after_status
    assert f("ACCP", reachable=True, has_payment_id=True) is ExpiryAction.APPLY_STATUS  # final wins
    assert f("ACSC", reachable=True, has_payment_id=True) is ExpiryAction.APPLY_STATUS
    assert f("RJCT", reachable=True, has_payment_id=True) is ExpiryAction.APPLY_STATUS
    assert f(rules.NOT_FOUND, reachable=True, has_payment_id=True) is ExpiryAction.APPLY_STATUS
    # CANC past the deadline is the SCA timeout itself (a rerun after our own cancel: same result).
    assert f("CANC", reachable=True, has_payment_id=True) is ExpiryAction.EXPIRE
    assert f("ACTC", reachable=True, has_payment_id=True) is ExpiryAction.CANCEL
    assert f("WHAT", reachable=True, has_payment_id=True) is ExpiryAction.CANCEL
    assert f(None, reachable=True, has_payment_id=True) is ExpiryAction.CANCEL  # unusable answer
    assert f(None, reachable=False, has_payment_id=True) is ExpiryAction.EXPIRE  # provider down: expire anyway
    assert f(None, reachable=True, has_payment_id=False) is ExpiryAction.EXPIRE


def test_watch_after_expiry():
    for c in Cancellation:
        assert rules.watch_after_expiry(c) is (c not in (Cancellation.NO_PAYMENT_ID, Cancellation.NOT_FOUND))


def test_restore_only_when_the_cached_balance_predates_the_payment():
    f = rules.should_restore_balance
    kw = {"account_currency": "NOK", "payment_created_at": T0, "payment_currency": "NOK"}
    assert f(balance=1000, balance_synced_at=T0 - timedelta(hours=1), **kw) == (True, "restored")
    assert f(balance=1000, balance_synced_at=T0 + timedelta(seconds=1), **kw) == (False, "synced_after_payment")
    assert f(balance=1000, balance_synced_at=T0, **kw) == (False, "synced_after_payment")
    assert f(balance=None, balance_synced_at=None, **kw) == (False, "no_cached_balance")
    assert f(balance=1000, balance_synced_at=None, **kw) == (True, "restored")
    assert f(balance=1000, balance_synced_at=T0 - timedelta(hours=1), **{**kw, "account_currency": "EUR"}) == \
        (False, "currency_mismatch")


def test_redebit_only_undoes_a_restore_the_balance_still_carries():
    f = rules.should_redebit_balance
    restored = T0
    assert f(balance=1, balance_synced_at=T0 - timedelta(hours=1), restored_at=restored) == (True, "redebited")
    assert f(balance=1, balance_synced_at=T0 + timedelta(minutes=5), restored_at=restored) == \
        (False, "synced_after_restore")
    assert f(balance=1, balance_synced_at=None, restored_at=None) == (False, "nothing_restored")
    assert f(balance=None, balance_synced_at=None, restored_at=restored) == (False, "no_cached_balance")


def test_sweep_cutoff():
    assert rules.sweep_cutoff(T0) == T0 - rules.SWEEP_GRACE
    assert rules.SWEEP_GRACE.total_seconds() > 60  # longer than the breaker's open period
