"""sca.expire_timeouts and the late-completion watch, against real PostgreSQL, Redis and the sandbox."""

import random
import threading
import time
from datetime import timedelta

import psycopg
import pytest

import jobs
from jobs import payments as rules
from jobs.pisp import PaymentBusy, poll_payment
from jobs.sca import expire_due, expire_payment
from tests.conftest import wait_for
from tests.jobs.payment_helpers import (
    AMOUNT,
    B0,
    FINAL_ACTIONS,
    adjustments,
    alerts,
    audits,
    balance,
    install_commit_crash,
    make_payment,
    notifications,
    outbox_polls,
    tx,
)
from worker.breaker import NEONOMICS_PISP, get_breaker

PAST = timedelta(seconds=301)  # older than SCA_TIMEOUT_SECONDS (300)
TIMEOUT_MSG = "Betalingen ble ikke bekreftet i tide. Vennligst prøv igjen."


def now_db(sql):
    return sql("SELECT now() AS t")[0]["t"]


def test_expiry_cancels_fails_restores_notifies_once_and_watches(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC", age=PAST)
    fresh = make_payment(sql, sandbox, status="ACTC", age=timedelta(seconds=290))
    now = now_db(sql)
    assert expire_due(now) == {"sca_timeout": 1}
    row = tx(sql, p["id"])
    assert (row["status"], row["failure_reason"]) == ("failed", "SCA_TIMEOUT")
    assert row["timed_out_at"] == now and row["next_poll_at"] == now + timedelta(seconds=60)
    assert sandbox.payment(p["payment_id"])["transactionStatus"] == "CANC"  # cancelled at the provider
    assert (sandbox.count("neonomics.status"), sandbox.count("neonomics.cancel")) == (1, 1)
    assert balance(sql, p["account_id"]) == B0 and adjustments(sql, p["id"]) == ["restore"]
    assert notifications(sql, p["user_id"]) == [{"kind": "payment_sca_timeout", "message": TIMEOUT_MSG}]
    audit = audits(sql, p["id"])
    assert [a["action"] for a in audit] == ["payment_sca_timeout"]
    assert audit[0]["details"]["cancellation"] == "cancelled" and audit[0]["details"]["balance_restored"] is True
    assert [o["payload"]["due"] for o in outbox_polls(sql, p["id"])] == [row["next_poll_at"].isoformat()]
    assert tx(sql, fresh["id"])["status"] == "processing"  # 290 s old: not yet due
    # Again (the next minute, or a second scheduler replica): nothing more happens.
    assert expire_due(now + timedelta(seconds=60)) == {"sca_timeout": 1}  # only `fresh`, now past its deadline
    assert len(notifications(sql, p["user_id"])) == 1 and balance(sql, p["account_id"]) == B0
    # The first watch check sees our own cancellation and ends the watch.
    assert poll_payment(p["id"], due=row["next_poll_at"].isoformat(), now=row["next_poll_at"]) == "end_watch"
    row = tx(sql, p["id"])
    assert (row["status"], row["provider_status"], row["next_poll_at"]) == ("failed", "CANC", None)


def test_injected_time_decides_the_deadline(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC")
    now = now_db(sql)
    assert expire_due(now + timedelta(seconds=299)) == {}
    assert expire_due(now + timedelta(seconds=301)) == {"sca_timeout": 1}
    assert tx(sql, p["id"])["status"] == "failed"


@pytest.mark.parametrize(("code", "status", "reason"), [
    ("ACSC", "completed", None), ("ACCP", "completed", None), ("RJCT", "failed", "REJECTED_BY_BANK"),
])
def test_a_final_status_at_expiry_wins(db, sql, sandbox, code, status, reason):
    p = make_payment(sql, sandbox, status=code, age=PAST)
    expire_due()
    row = tx(sql, p["id"])
    assert (row["status"], row["failure_reason"], row["provider_status"]) == (status, reason, code)
    assert sandbox.count("neonomics.cancel") == 0  # an accepted payment is never cancelled or failed
    assert len(notifications(sql, p["user_id"])) == 1


def test_balance_synced_after_the_payment_is_not_restored(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC", age=PAST, synced="after")
    expire_due()
    assert tx(sql, p["id"])["failure_reason"] == "SCA_TIMEOUT"
    assert balance(sql, p["account_id"]) == B0 - AMOUNT and adjustments(sql, p["id"]) == []
    assert audits(sql, p["id"])[0]["details"]["balance_note"] == "synced_after_payment"


def test_cancellation_refused_then_still_pending_expires_and_watches(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC", age=PAST)
    sandbox.fault("neonomics.cancel", status=400, code="CANCELLATION_INVALID")
    assert expire_payment(p["id"]) == "sca_timeout"
    row = tx(sql, p["id"])
    assert (row["status"], row["failure_reason"], row["poll_count"]) == ("failed", "SCA_TIMEOUT", 2)  # re-read once
    assert row["next_poll_at"] is not None
    assert audits(sql, p["id"])[0]["details"]["cancellation"] == "refused"


def test_cancellation_refused_because_the_bank_completed_it(db, sql, sandbox):
    # First read ACTC; the cancel is refused; the re-read says ACSC: completed, not failed.
    p = make_payment(sql, sandbox, script=["RCVD", "ACTC", "ACSC"], age=PAST)
    sandbox.fault("neonomics.cancel", status=400, code="CANCELLATION_INVALID")
    assert expire_payment(p["id"]) == "complete"
    row = tx(sql, p["id"])
    assert (row["status"], row["provider_status"]) == ("completed", "ACSC")
    assert balance(sql, p["account_id"]) == B0 - AMOUNT
    assert [n["kind"] for n in notifications(sql, p["user_id"])] == ["payment_completed"]


@pytest.mark.parametrize("outage", ["503", "breaker_open"])
def test_provider_down_during_expiry_still_expires_and_watches(db, sql, sandbox, outage):
    p = make_payment(sql, sandbox, status="ACTC", age=PAST)
    sandbox.clear_requests()
    if outage == "503":
        sandbox.fault("neonomics.*", status=503)
    else:
        get_breaker(NEONOMICS_PISP).open()
    assert expire_payment(p["id"]) == "sca_timeout"
    row = tx(sql, p["id"])
    assert (row["status"], row["failure_reason"]) == ("failed", "SCA_TIMEOUT")
    assert row["next_poll_at"] is not None  # watched for a late success
    assert audits(sql, p["id"])[0]["details"]["cancellation"] == "unreachable"
    assert balance(sql, p["account_id"]) == B0
    # 503 on the status read: the provider is down, no cancel is attempted; breaker open: nothing sent.
    assert sandbox.count("neonomics.*") == (1 if outage == "503" else 0)


def metric(name, **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_bank_completes_after_the_deadline(db, sql, sandbox, caplog):
    before = (metric("drop_payment_late_completions_total"),
              metric("drop_payment_sca_expirations_total", cancellation="unreachable"),
              metric("drop_payments_final_total", outcome="sca_timeout"),
              metric("drop_payment_time_to_final_seconds_count", outcome="failed"))
    p = make_payment(sql, sandbox, status="ACTC", age=PAST)
    sandbox.fault("neonomics.cancel", status=503)  # our cancellation never reached the bank
    expire_payment(p["id"])
    assert balance(sql, p["account_id"]) == B0
    sandbox.clear_faults()
    sandbox.set_payment(p["payment_id"], status="ACSC")  # the user finished SCA late; the bank paid
    watch = tx(sql, p["id"])
    assert poll_payment(p["id"], due=watch["next_poll_at"].isoformat()) == "late_complete"
    row = tx(sql, p["id"])
    assert (row["status"], row["failure_reason"], row["provider_status"]) == ("completed", None, "ACSC")
    assert row["completed_late_at"] is not None and row["timed_out_at"] is not None and row["next_poll_at"] is None
    assert balance(sql, p["account_id"]) == B0 - AMOUNT  # debited again, exactly once
    assert adjustments(sql, p["id"]) == ["restore", "redebit"]
    assert [n["kind"] for n in notifications(sql, p["user_id"])] == ["payment_sca_timeout", "payment_completed_late"]
    assert [a["action"] for a in audits(sql, p["id"])] == ["payment_sca_timeout", "payment_late_completion"]
    after = (metric("drop_payment_late_completions_total"),
             metric("drop_payment_sca_expirations_total", cancellation="unreachable"),
             metric("drop_payments_final_total", outcome="sca_timeout"),
             metric("drop_payment_time_to_final_seconds_count", outcome="failed"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]
    sent = alerts(caplog, "Payment completed after SCA timeout")
    assert len(sent) == 1 and sent[0].levelname == "ERROR" and p["id"] in sent[0].getMessage()
    # Any further poll (callback, duplicate) changes nothing.
    assert poll_payment(p["id"]) == "skip_final"
    assert poll_payment(p["id"], due=watch["next_poll_at"].isoformat()) == "skip_final"
    assert balance(sql, p["account_id"]) == B0 - AMOUNT and len(notifications(sql, p["user_id"])) == 2


def test_late_completion_leaves_a_balance_synced_since_the_restore(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC", age=PAST)
    sandbox.fault("neonomics.cancel", status=503)
    expire_payment(p["id"])
    sql("UPDATE bank_accounts SET balance = 55500, balance_synced_at = now() + interval '1 minute' WHERE id = %s",
        (p["account_id"],))
    sandbox.set_payment(p["payment_id"], status="ACCP")
    assert poll_payment(p["id"]) == "late_complete"
    assert balance(sql, p["account_id"]) == 55500  # the sync is the bank's truth; not guessed at
    assert adjustments(sql, p["id"]) == ["restore"]


def test_watch_ends_after_24_hours_with_a_warning(db, sql, sandbox, caplog):
    p = make_payment(sql, sandbox, status="ACTC", age=PAST)
    sandbox.fault("neonomics.cancel", status=503)
    expire_payment(p["id"])
    sandbox.clear_faults()
    timed_out = tx(sql, p["id"])["timed_out_at"]
    assert poll_payment(p["id"], now=timed_out + timedelta(hours=24)) == "end_watch_unresolved"
    row = tx(sql, p["id"])
    assert (row["status"], row["next_poll_at"]) == ("failed", None)
    assert len(alerts(caplog, "Payment still pending at the bank after 24 h")) == 1


def test_payment_without_provider_id_expires_without_watch(db, sql, sandbox):
    p = make_payment(sql, sandbox, payment_id=None, age=PAST)
    assert expire_payment(p["id"]) == "sca_timeout"
    row = tx(sql, p["id"])
    assert (row["status"], row["next_poll_at"]) == ("failed", None)
    assert sandbox.count("neonomics.*") == 0


def test_worker_killed_between_cancel_and_commit(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC", age=PAST)
    install_commit_crash(sql)
    with pytest.raises(psycopg.errors.RaiseException):
        expire_payment(p["id"])
    # The bank cancelled the payment; the database knows nothing of it.
    assert sandbox.payment(p["payment_id"])["transactionStatus"] == "CANC"
    assert tx(sql, p["id"])["status"] == "processing"
    assert notifications(sql, p["user_id"]) == [] and adjustments(sql, p["id"]) == []
    # The rerun reads CANC (our own cancellation) and gives the same result: SCA_TIMEOUT, once.
    assert expire_payment(p["id"]) == "sca_timeout"
    row = tx(sql, p["id"])
    assert (row["status"], row["failure_reason"], row["provider_status"]) == ("failed", "SCA_TIMEOUT", "CANC")
    assert notifications(sql, p["user_id"]) == [{"kind": "payment_sca_timeout", "message": TIMEOUT_MSG}]
    assert balance(sql, p["account_id"]) == B0 and adjustments(sql, p["id"]) == ["restore"]
    assert audits(sql, p["id"])[0]["details"]["cancellation"] == "already_cancelled"


def test_race_of_poll_and_expiry_has_exactly_one_outcome(db, sql, sandbox):
    """Two polls and two expiry runs on the same payment at once, many times: one final outcome,
    the balance restored at most once, and never 'completed' for a payment we cancelled."""
    rng = random.Random(5)
    # Each read moves the payment one step: whoever reads first sees the second entry.
    scripts = [["RCVD", "ACTC", "ACCP"], ["RCVD", "ACCP"], ["RCVD", "ACTC"], ["RCVD", "RJCT"],
               ["RCVD", "ACSC"], ["RCVD", "ACTC", "ACSC"]]
    outcomes: dict[str, int] = {}
    winners: dict[str, int] = {}
    for _ in range(50):
        p = make_payment(sql, sandbox, script=rng.choice(scripts), age=PAST)
        due = tx(sql, p["id"])["next_poll_at"].isoformat()
        barrier = threading.Barrier(4)
        # Wide enough for either order: without a lock across its read, a poll is first only if its
        # read and apply are done before the expiry locks the row.
        jitter = [rng.uniform(0, 0.005) for _ in range(2)] + [rng.uniform(0, 0.06) for _ in range(2)]
        errors: list[BaseException] = []

        def run(fn, who, delay, barrier=barrier, errors=errors):
            barrier.wait()
            time.sleep(delay)  # so either side may reach the row first
            try:
                result = fn()
            except PaymentBusy:
                return
            except BaseException as exc:
                errors.append(exc)
                return
            if result in ("complete", "fail", "sca_timeout"):
                winners[who] = winners.get(who, 0) + 1

        threads = [threading.Thread(target=run, args=(f, who, delay)) for (f, who), delay in zip((
            (lambda p=p: poll_payment(p["id"]), "poll"),  # the SCA callback
            (lambda p=p, due=due: poll_payment(p["id"], due=due), "poll"),  # the scheduled poll
            (lambda p=p: expire_payment(p["id"]), "expiry"),
            (lambda p=p: expire_payment(p["id"]), "expiry"),  # a second scheduler replica's run
        ), jitter, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        expire_payment(p["id"])  # settle: a run that found the row locked comes back next minute
        row = tx(sql, p["id"])
        assert row["status"] in ("completed", "failed")
        finals = [a for a in audits(sql, p["id"]) if a["action"] in FINAL_ACTIONS]
        assert len(finals) == 1, finals
        assert len(notifications(sql, p["user_id"])) == 1
        if row["status"] == "completed":
            assert balance(sql, p["account_id"]) == B0 - AMOUNT and adjustments(sql, p["id"]) == []
            assert sandbox.payment(p["payment_id"])["transactionStatus"] != "CANC"
        else:
            assert balance(sql, p["account_id"]) == B0 and adjustments(sql, p["id"]) == ["restore"]
        key = row["failure_reason"] or row["status"]
        outcomes[key] = outcomes.get(key, 0) + 1
    assert outcomes.get("completed", 0) > 0 and outcomes.get("SCA_TIMEOUT", 0) > 0, outcomes
    # The race went both ways: sometimes the poll applied the final status, sometimes the expiry.
    assert winners.get("poll", 0) > 0 and winners.get("expiry", 0) > 0, winners
    print("race outcomes", outcomes, "applied by", winners)


def test_expiry_actor_through_the_outbox_and_worker(db, sql, sandbox, relay, worker):
    p = make_payment(sql, sandbox, status="PDNG", age=PAST)
    jobs.enqueue("sca.expire_timeouts", {"slot": "2026-03-01T12:00:00+01:00"},
                 idempotency_key="schedule:sca.expire_timeouts:2026-03-01T12:00:00+01:00")
    wait_for(lambda: tx(sql, p["id"])["status"] == "failed", what="expiry through the worker")
    # The first watch poll was scheduled through the outbox, a minute ahead.
    assert [o["payload"]["due"] for o in outbox_polls(sql, p["id"])] == [tx(sql, p["id"])["next_poll_at"].isoformat()]
    assert rules.map_status(tx(sql, p["id"])["provider_status"]) is rules.Outcome.PENDING
