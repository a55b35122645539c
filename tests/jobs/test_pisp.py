"""pisp.poll_status and pisp.sweep against real PostgreSQL, Redis and the sandbox over HTTP."""

import threading
from datetime import timedelta

import dramatiq
import psycopg
import pytest

import jobs
from jobs import payments as rules
from jobs.pisp import poll_payment, poll_status, sweep
from tests.conftest import wait_for
from tests.jobs.payment_helpers import (
    AMOUNT,
    B0,
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
from worker.outcomes import RunLater
from worker.relay import relay_once
from worker.retry import PermanentError

EXPECTED = {
    **{c: ("completed", None) for c in ("ACCP", "ACSP", "ACSC", "ACCC", "ACWC")},
    "RJCT": ("failed", "REJECTED_BY_BANK"),
    "CANC": ("failed", "CANCELLED_AT_BANK"),
    **{c: ("processing", None) for c in ("RCVD", "PDNG", "ACTC", "ACFC", "PATC", "PART", "NEWCODE1")},
}


def test_every_status_code_of_the_map(db, sql, sandbox):
    for code, (status, reason) in EXPECTED.items():
        p = make_payment(sql, sandbox, status=code)
        result = poll_payment(p["id"])
        row = tx(sql, p["id"])
        assert (row["status"], row["failure_reason"], row["provider_status"]) == (status, reason, code), code
        assert row["poll_count"] == 1 and row["last_polled_at"] is not None
        kinds = [n["kind"] for n in notifications(sql, p["user_id"])]
        if status == "completed":
            assert result == "complete" and kinds == ["payment_completed"]
            assert row["next_poll_at"] is None and balance(sql, p["account_id"]) == B0 - AMOUNT
            assert [a["action"] for a in audits(sql, p["id"])] == ["payment_completed"]
        elif status == "failed":
            assert result == "fail" and kinds == ["payment_failed"]
            assert row["next_poll_at"] is None
            assert balance(sql, p["account_id"]) == B0  # restored
            assert adjustments(sql, p["id"]) == ["restore"]
            audit = audits(sql, p["id"])
            assert [a["action"] for a in audit] == ["payment_failed"]
            assert audit[0]["details"]["balance_restored"] is True
            assert audit[0]["details"]["reason"] == reason
        else:
            # Still pending: the callback-style poll restarts the fast backoff, next poll in 2 s,
            # and its outbox row exists (deduplicated on transaction + due time).
            assert result == "reschedule" and kinds == []
            assert row["poll_step"] == 1
            assert timedelta(seconds=1) < row["next_poll_at"] - row["last_polled_at"] <= timedelta(seconds=2)
            polls = outbox_polls(sql, p["id"])
            assert [o["payload"] for o in polls] == [
                {"transaction_id": p["id"], "due": row["next_poll_at"].isoformat()}]
            assert polls[0]["available_at"] == row["next_poll_at"]
            assert balance(sql, p["account_id"]) == B0 - AMOUNT
    assert sandbox.count("neonomics.status") == len(EXPECTED)


def test_failure_restores_only_a_balance_synced_before_the_payment(db, sql, sandbox):
    newer = make_payment(sql, sandbox, status="RJCT", synced="after")
    never = make_payment(sql, sandbox, status="RJCT", synced="never")
    poll_payment(newer["id"])
    poll_payment(never["id"])
    assert balance(sql, newer["account_id"]) == B0 - AMOUNT  # the newer sync already shows the bank
    assert audits(sql, newer["id"])[0]["details"]["balance_note"] == "synced_after_payment"
    assert balance(sql, never["account_id"]) is None
    assert adjustments(sql, newer["id"]) == adjustments(sql, never["id"]) == []


@pytest.mark.parametrize("code", ["ACSC", "RJCT"])
def test_repeated_and_concurrent_polls_change_nothing(db, sql, sandbox, code):
    p = make_payment(sql, sandbox, status=code)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def poll():
        barrier.wait()
        try:
            poll_payment(p["id"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent_reads = sandbox.count("neonomics.status")
    for _ in range(3):
        poll_payment(p["id"])
    assert errors == []
    assert len(notifications(sql, p["user_id"])) == 1
    assert len([a for a in audits(sql, p["id"]) if a["action"] in ("payment_completed", "payment_failed")]) == 1
    # No lock is held across the read, so the concurrent polls may each have read; exactly one
    # applied its read, the others found the row changed and final. Later polls do not read.
    assert tx(sql, p["id"])["poll_count"] == 1
    assert 1 <= concurrent_reads <= 8 and sandbox.count("neonomics.status") == concurrent_reads
    assert balance(sql, p["account_id"]) == (B0 if code == "RJCT" else B0 - AMOUNT)
    assert len(adjustments(sql, p["id"])) == (1 if code == "RJCT" else 0)


def test_a_scheduled_poll_that_lost_its_schedule_does_nothing(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC")
    poll_payment(p["id"])  # SCA callback: now + 2 s
    first_due = tx(sql, p["id"])["next_poll_at"].isoformat()
    assert poll_payment(p["id"], due=first_due) == "reschedule"  # the owner of the schedule
    row = tx(sql, p["id"])
    assert row["poll_step"] == 2
    assert row["next_poll_at"] - row["last_polled_at"] == timedelta(seconds=4)
    # A duplicate of the first scheduled poll (relay redelivery, sweep) finds the schedule moved on.
    assert poll_payment(p["id"], due=first_due) == "skip_stale"
    assert sandbox.count("neonomics.status") == 2
    assert len(outbox_polls(sql, p["id"])) == 2  # one successor per schedule step, no fork


def test_callback_restarts_the_fast_backoff(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC")
    sql("UPDATE transactions SET poll_step = 5 WHERE id = %s", (p["id"],))
    poll_payment(p["id"], due=tx(sql, p["id"])["next_poll_at"].isoformat())
    row = tx(sql, p["id"])
    assert row["next_poll_at"] - row["last_polled_at"] == timedelta(seconds=60)  # capped
    poll_payment(p["id"])  # the user is back from SCA
    row = tx(sql, p["id"])
    assert row["next_poll_at"] - row["last_polled_at"] == timedelta(seconds=2)


def test_payment_without_provider_id_keeps_its_schedule_without_calls(db, sql, sandbox):
    p = make_payment(sql, sandbox, payment_id=None)
    assert poll_payment(p["id"]) == "reschedule"
    assert sandbox.count("neonomics.status") == 0
    assert tx(sql, p["id"])["poll_count"] == 0


def test_404_unknown_payment_fails_with_a_clear_reason_and_an_alert(db, sql, sandbox, caplog):
    p = make_payment(sql, sandbox, payment_id="pay_unknown_at_bank")
    assert poll_payment(p["id"]) == "fail"
    row = tx(sql, p["id"])
    assert (row["status"], row["failure_reason"]) == ("failed", "PAYMENT_NOT_FOUND")
    assert balance(sql, p["account_id"]) == B0
    assert notifications(sql, p["user_id"])[0]["message"] == rules.MESSAGES["PAYMENT_NOT_FOUND"]
    sent = alerts(caplog, "Payment unknown at the provider")
    assert len(sent) == 1 and p["id"] in sent[0].getMessage()
    assert "pay_unknown_at_bank" not in sent[0].getMessage()  # transaction ids and codes only


def test_breaker_open_reschedules_after_the_open_period(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACSC")
    get_breaker(NEONOMICS_PISP).open()
    later = poll_status(transaction_id=p["id"])
    assert isinstance(later, RunLater) and 55_000 <= later.delay_ms <= 61_000  # the open period (60 s) + jitter
    assert tx(sql, p["id"])["status"] == "processing" and tx(sql, p["id"])["poll_count"] == 0
    assert sandbox.count("neonomics.status") == 0


def test_breaker_open_end_to_end_does_not_burn_retries(db, sql, sandbox, monkeypatch, relay, worker):
    from worker.breaker import reset_breakers
    from worker.settings import get_settings

    monkeypatch.setenv("DROP_BREAKER_RESET_TIMEOUT_S", "1")
    get_settings.cache_clear()
    reset_breakers()
    p = make_payment(sql, sandbox, status="ACSC")
    get_breaker(NEONOMICS_PISP).open()
    jobs.enqueue("pisp.poll_status", {"transaction_id": p["id"]},
                 idempotency_key=f"pisp.poll_status:{p['id']}:sca-callback")
    wait_for(lambda: tx(sql, p["id"])["status"] == "completed", timeout=15, what="completion after the breaker")
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0
    wait_for(lambda: sql("SELECT done_at FROM job_outbox WHERE job = 'pisp.poll_status'")[0]["done_at"],
             what="outbox row done")


def test_transient_5xx_is_retried_by_the_worker(db, sql, sandbox, relay, worker):
    p = make_payment(sql, sandbox, status="ACSC")
    sandbox.fault("neonomics.status", status=503, count=1)
    jobs.enqueue("pisp.poll_status", {"transaction_id": p["id"]})
    wait_for(lambda: tx(sql, p["id"])["status"] == "completed", timeout=15, what="completion after a 503")
    assert sandbox.count("neonomics.status") == 2
    assert len(notifications(sql, p["user_id"])) == 1


def test_unparseable_status_is_dead_lettered_and_polled_again_later(db, sql, sandbox, relay, worker):
    p = make_payment(sql, sandbox, status="NOT-A-CODE")  # not a Berlin Group code: malformed answer
    jobs.enqueue("pisp.poll_status", {"transaction_id": p["id"]})
    dead = wait_for(lambda: sql("SELECT job, reason FROM dead_letters"), what="dead letter")
    assert dead[0]["job"] == "pisp.poll_status"
    assert dead[0]["reason"].startswith("MalformedResponseError: neonomics.status")
    row = tx(sql, p["id"])
    assert row["status"] == "processing"
    assert timedelta(minutes=4) < row["next_poll_at"] - row["last_polled_at"] <= timedelta(minutes=5)
    assert [a["action"] for a in audits(sql, p["id"])] == ["payment_poll_error"]
    assert sandbox.count("neonomics.status") == 1  # a permanent error is not retried


def test_bad_payloads_and_unknown_transactions_are_dead_lettered(db, sql, sandbox, relay, worker):
    jobs.enqueue("pisp.poll_status", {"transaction_id": "tx_nobody"})
    jobs.enqueue("pisp.poll_status", {"transaction_id": ""})
    jobs.enqueue("pisp.poll_status", {"transaction_id": "tx_x", "due": "yesterday"})
    rows = wait_for(lambda: (r := sql("SELECT reason FROM dead_letters ORDER BY reason")) and len(r) == 3 and r,
                    what="3 dead letters")
    reasons = [r["reason"] for r in rows]
    assert "PermanentError: pisp.poll_status: transaction tx_nobody not found" in reasons
    assert "PermanentError: pisp.poll_status: invalid payload: transaction_id must be a non-empty string" in reasons
    assert "PermanentError: pisp.poll_status: invalid payload: due must be an ISO 8601 time" in reasons
    with pytest.raises(PermanentError):
        poll_payment(None)  # type: ignore[arg-type]


def test_worker_killed_between_provider_call_and_commit(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="RJCT")
    install_commit_crash(sql)
    with pytest.raises(psycopg.errors.RaiseException):
        poll_payment(p["id"])
    # The provider was asked; nothing of it reached the database.
    assert sandbox.count("neonomics.status") == 1
    row = tx(sql, p["id"])
    assert (row["status"], row["poll_count"]) == ("processing", 0)
    assert balance(sql, p["account_id"]) == B0 - AMOUNT
    assert notifications(sql, p["user_id"]) == [] and adjustments(sql, p["id"]) == []
    # The rerun (redelivery) gives the result an uninterrupted run would have given.
    assert poll_payment(p["id"]) == "fail"
    assert tx(sql, p["id"])["failure_reason"] == "REJECTED_BY_BANK"
    assert balance(sql, p["account_id"]) == B0
    assert len(notifications(sql, p["user_id"])) == 1 and adjustments(sql, p["id"]) == ["restore"]


def test_sweep_rederives_polls_after_redis_is_flushed(db, sql, sandbox, broker):
    payments = [make_payment(sql, sandbox, status="ACSC") for _ in range(3)]
    later = make_payment(sql, sandbox, status="ACSC")
    sql("UPDATE transactions SET next_poll_at = now() + interval '1 hour' WHERE id = %s", (later["id"],))
    done = make_payment(sql, sandbox, status="ACSC")
    poll_payment(done["id"])
    # Their polls were relayed to Redis … and Redis lost everything.
    for p in payments:
        jobs.enqueue("pisp.poll_status", {"transaction_id": p["id"]}, idempotency_key=f"first:{p['id']}")
    assert relay_once().sent == 3
    broker.flush_all()
    now = sql("SELECT now() AS t")[0]["t"] + rules.SWEEP_GRACE + timedelta(seconds=1)
    assert sweep(now, slot="2026-03-01T12:01:00+01:00") == 3
    assert sweep(now, slot="2026-03-01T12:01:00+01:00") == 0  # the same slot again: deduplicated
    keys = sorted(r["idempotency_key"] for r in sql(
        "SELECT idempotency_key FROM job_outbox WHERE idempotency_key LIKE '%%:sweep:%%'"))
    assert keys == sorted(f"drop:pisp.poll_status:{p['id']}:sweep:2026-03-01T12:01:00+01:00" for p in payments)
    # A worker and relay come back: the swept polls complete the payments.
    from worker.relay import drain

    drain()
    w = dramatiq.Worker(broker, worker_threads=4, worker_timeout=50)
    w.start()
    try:
        for p in payments:
            wait_for(lambda p=p: tx(sql, p["id"])["status"] == "completed", what="swept poll applied")
    finally:
        w.stop(timeout=10_000)
        broker.middleware[:] = [m for m in broker.middleware if type(m).__name__ != "_WorkerMiddleware"]
    assert tx(sql, later["id"])["status"] == "processing"
    assert all(len(notifications(sql, p["user_id"])) == 1 for p in payments)


def test_sweep_actor_accepts_the_scheduler_payload(db, sql, sandbox):
    p = make_payment(sql, sandbox, status="ACTC")
    sql("UPDATE transactions SET next_poll_at = now() - interval '10 minutes' WHERE id = %s", (p["id"],))
    jobs.pisp.sweep_job(slot="2026-03-01T12:02:00+01:00")
    jobs.pisp.sweep_job()
    assert len(outbox_polls(sql, p["id"])) == 2  # scheduler slot + ad hoc minute
