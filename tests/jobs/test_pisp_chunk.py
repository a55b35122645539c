"""pisp.poll_status_chunk: the relay's chunks of due polls, each poll ending exactly as if it had run
alone (real PostgreSQL, Redis and the sandbox over HTTP; the relay's chunking; a kill mid-chunk)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import dramatiq
import pytest

import jobs
from jobs.pisp import CHUNK_JOB, POLL_JOB, poll_payment, process_chunk
from tests.conftest import wait_for
from tests.jobs.payment_helpers import (
    AMOUNT,
    B0,
    adjustments,
    audits,
    balance,
    install_commit_crash,
    make_payment,
    notifications,
    tx,
)
from worker.breaker import NEONOMICS_PISP, get_breaker
from worker.outcomes import RunLater

# One of each path a poll can take: completed, rejected, cancelled, pending, 404, no payment id yet.
KINDS = [{"status": "ACSC"}, {"status": "RJCT"}, {"status": "CANC"}, {"status": "ACTC"},
         {"payment_id": "pay_unknown_at_bank"}, {"payment_id": None}, {"status": "ACCP"}, {"status": "PDNG"}]


def payments(sql, sandbox, n: int = 16) -> list[dict]:
    out = []
    for i in range(n):
        kind = dict(KINDS[i % len(KINDS)])
        if kind.get("payment_id") == "pay_unknown_at_bank":
            kind["payment_id"] = f"pay_unknown_{uuid.uuid4().hex[:8]}"  # payment ids are unique
        out.append(make_payment(sql, sandbox, **kind))
    return out


def enqueue_polls(ps: list[dict], tag: str = "sca-callback") -> list[int]:
    """One `pisp.poll_status` row per payment (the enqueue contract), committed together."""
    from db.pool import transaction

    with transaction() as conn:
        return [jobs.enqueue(POLL_JOB, {"transaction_id": p["id"]}, idempotency_key=f"{POLL_JOB}:{p['id']}:{tag}",
                             conn=conn) for p in ps]


def effects(sql, ps: list[dict]) -> list[tuple]:
    """Everything a poll changes, per payment (times aside: they differ between runs)."""
    out = []
    for p in ps:
        row = tx(sql, p["id"])
        out.append((row["status"], row["failure_reason"], row["provider_status"], row["poll_count"], row["poll_step"],
                    row["next_poll_at"] is not None, balance(sql, p["account_id"]), adjustments(sql, p["id"]),
                    [n["kind"] for n in notifications(sql, p["user_id"])],
                    [(a["action"], a["details"].get("reason")) for a in audits(sql, p["id"])]))
    return out


def open_rows(sql) -> int:
    """The callers' poll rows still to do (a pending poll's successor, key `drop:…`, is not one)."""
    return sql("SELECT count(*) AS n FROM job_outbox WHERE job = %s AND done_at IS NULL AND error IS NULL "
               "AND idempotency_key NOT LIKE 'drop:%%'", (POLL_JOB,))[0]["n"]


def test_a_chunk_leaves_exactly_what_the_same_polls_one_by_one_leave(db, sql, sandbox, broker):
    alone, chunked = payments(sql, sandbox), payments(sql, sandbox)
    for p in alone:
        poll_payment(p["id"])
    assert process_chunk(enqueue_polls(chunked)) is None
    assert effects(sql, chunked) == effects(sql, alone)
    assert open_rows(sql) == 0  # every poll row done with its effects
    # Each poll's audit row carries that poll's request id, not the chunk's.
    rids = [a["details"]["request_id"] for p in chunked for a in audits(sql, p["id"])]
    assert len(set(rids)) == len(rids)


def test_duplicates_in_a_chunk_and_a_redelivered_chunk_change_nothing(db, sql, sandbox, broker):
    ps = [make_payment(sql, sandbox, status="ACSC"), make_payment(sql, sandbox, status="RJCT")]
    ids = enqueue_polls(ps) + enqueue_polls(ps, tag="initiated")  # the callback and the initiation poll
    assert process_chunk(ids) is None
    assert process_chunk(ids) is None  # redelivered: its rows are done, nothing runs
    for p in ps:
        assert tx(sql, p["id"])["poll_count"] == 1
        assert len(notifications(sql, p["user_id"])) == 1
        assert len([a for a in audits(sql, p["id"]) if a["action"].startswith("payment_")]) == 1
    assert balance(sql, ps[1]["account_id"]) == B0 and adjustments(sql, ps[1]["id"]) == ["restore"]
    assert open_rows(sql) == 0


def test_breaker_open_the_chunk_waits_and_nothing_is_dead_lettered(db, sql, sandbox, broker):
    ps = [make_payment(sql, sandbox, status="ACSC") for _ in range(5)]
    ids = enqueue_polls(ps)
    get_breaker(NEONOMICS_PISP).open()
    later = process_chunk(ids)
    assert isinstance(later, RunLater) and 55_000 <= later.delay_ms <= 61_000  # the open period + jitter
    assert sandbox.count("neonomics.status") == 0 and open_rows(sql) == 5
    assert all(tx(sql, p["id"])["poll_count"] == 0 for p in ps)
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0
    get_breaker(NEONOMICS_PISP).close()
    assert process_chunk(ids) is None  # the rerun after the wait
    assert {tx(sql, p["id"])["status"] for p in ps} == {"completed"} and open_rows(sql) == 0


def test_a_bad_poll_is_dead_lettered_alone_and_the_others_commit(db, sql, sandbox, broker, worker):
    good = [make_payment(sql, sandbox, status="ACSC") for _ in range(3)]
    garbage = make_payment(sql, sandbox, status="NOT-A-CODE")  # a malformed answer
    ids = enqueue_polls([*good, garbage])
    unknown = jobs.enqueue(POLL_JOB, {"transaction_id": "tx_nobody"}, idempotency_key="poll-nobody")
    # A caller in another language may write a payload jobs.enqueue would refuse.
    extra = sql("""INSERT INTO job_outbox (job, payload, idempotency_key) VALUES (%s, %s::jsonb, 'poll-extra')
                   RETURNING id""", (POLL_JOB, json.dumps({"transaction_id": good[0]["id"], "surprise": 1})))[0]["id"]
    assert process_chunk([*ids, unknown, extra]) is None
    assert {tx(sql, p["id"])["status"] for p in good} == {"completed"}
    letters = wait_for(lambda: (r := sql("SELECT outbox_id, reason FROM dead_letters")) and len(r) == 3 and r,
                       timeout=20, what="three dead letters")
    dead = {r["outbox_id"]: r["reason"] for r in letters}
    assert dead[unknown] == "PermanentError: pisp.poll_status: transaction tx_nobody not found"
    assert dead[ids[3]].startswith("MalformedResponseError: neonomics.status")
    assert "surprise" in dead[extra]  # it ran alone, refused as a message of its own
    row = tx(sql, garbage["id"])  # as a single poll: audited, next poll in 5 min, row done
    assert row["status"] == "processing" and timedelta(minutes=4) < row["next_poll_at"] - row["last_polled_at"]
    assert [a["action"] for a in audits(sql, garbage["id"])] == ["payment_poll_error"]
    closed = {r["id"]: r for r in sql("SELECT id, done_at, error FROM job_outbox WHERE id = ANY(%s)",
                                      ([unknown, extra],))}
    assert all(c["error"].startswith("dead-lettered") for c in closed.values())


def test_transient_errors_retry_the_chunk_for_those_polls_only(db, sql, sandbox, broker, monkeypatch):
    import jobs.pisp as pisp

    ps = [make_payment(sql, sandbox, status="ACSC") for _ in range(4)]
    ids = enqueue_polls(ps)
    sandbox.fault("neonomics.status", status=503, count=1)
    with pytest.raises(Exception) as raised:
        process_chunk(ids)
    assert "503" in str(raised.value) or type(raised.value).__name__ == "ServerError"
    assert open_rows(sql) == 1  # the three others committed
    assert process_chunk(ids) is None  # Dramatiq's retry: only the one left runs
    assert {tx(sql, p["id"])["status"] for p in ps} == {"completed"}
    assert sandbox.count("neonomics.status") == 5
    # With its retries spent, a poll that still fails is dead-lettered alone, like a single poll.
    more = [make_payment(sql, sandbox, status="ACSC") for _ in range(2)]
    more_ids = enqueue_polls(more)
    sandbox.fault("neonomics.status", status=503, count=1)
    monkeypatch.setattr(pisp, "attempts_so_far", lambda: 3)
    assert process_chunk(more_ids) is None
    dead = sql("SELECT outbox_id, reason FROM dead_letters")
    assert len(dead) == 1 and dead[0]["outbox_id"] in more_ids and dead[0]["reason"].startswith("ServerError")


def test_a_chunk_whose_apply_fails_before_its_commit_leaves_every_poll_as_it_was(db, sql, sandbox, broker,
                                                                               monkeypatch):
    import psycopg

    import jobs.pisp as pisp

    ps = payments(sql, sandbox, n=8)
    ids = enqueue_polls(ps)
    before = effects(sql, ps)

    def lost(conn, outbox_ids):  # the apply's last statement: every effect was already written
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(pisp.outbox, "mark_done_many", lost)
    with pytest.raises(psycopg.OperationalError):  # transient: Dramatiq retries the chunk
        process_chunk(ids)
    assert effects(sql, ps) == before and open_rows(sql) == 8
    monkeypatch.undo()
    assert process_chunk(ids) is None  # the retry: each effect once
    reference = payments(sql, sandbox, n=8)
    for p in reference:
        poll_payment(p["id"])
    assert effects(sql, ps) == effects(sql, reference)


def test_a_chunk_that_cannot_commit_for_good_runs_each_poll_alone(db, sql, sandbox, broker, worker):
    ps = payments(sql, sandbox, n=8)
    ids = enqueue_polls(ps)
    install_commit_crash(sql)  # a SQL error at COMMIT: not transient, the chunk path gives up
    assert process_chunk(ids) is None
    wait_for(lambda: open_rows(sql) == 0, timeout=30, what="each poll run alone")
    reference = payments(sql, sandbox, n=8)
    for p in reference:
        poll_payment(p["id"])
    assert effects(sql, ps) == effects(sql, reference)


def test_a_row_changed_between_read_and_apply_is_read_again(db, sql, sandbox, broker, monkeypatch):
    """The SCA expiry (or another poll) commits while this chunk's reads are in flight."""
    import jobs.pisp as pisp

    p = make_payment(sql, sandbox, status="ACTC")
    ids = enqueue_polls([p])
    real = pisp._read_statuses
    calls = []

    def read_then_someone_else_commits(requests):
        result = real(requests)
        if not calls:  # first round only: a concurrent poll moved the schedule on
            sql("UPDATE transactions SET poll_count = poll_count + 1, poll_step = 3 WHERE id = %s", (p["id"],))
        calls.append(len(requests))
        return result

    monkeypatch.setattr(pisp, "_read_statuses", read_then_someone_else_commits)
    assert process_chunk(ids) is None
    assert calls == [1, 1]  # read, found changed, planned again, read again, applied
    row = tx(sql, p["id"])
    assert row["poll_count"] == 2 and row["poll_step"] == 1  # the ad hoc poll restarted the backoff


def test_the_relay_sends_due_polls_as_a_chunk_and_a_lone_one_as_itself(db, sql, sandbox, broker):
    from worker.relay import relay_once

    enqueue_polls([make_payment(sql, sandbox, status="ACSC") for _ in range(5)])
    assert relay_once().sent == 5
    [only] = [dramatiq.Message.decode(m) for m in broker.client.hvals(f"{broker.namespace}:pisp.msgs")]
    assert only.actor_name == CHUNK_JOB and len(only.kwargs["outbox_ids"]) == 5
    broker.flush_all()
    enqueue_polls([make_payment(sql, sandbox, status="ACSC")])
    assert relay_once().sent == 1
    [lone] = [dramatiq.Message.decode(m) for m in broker.client.hvals(f"{broker.namespace}:pisp.msgs")]
    assert lone.actor_name == POLL_JOB and lone.options["outbox_id"]


def test_a_burst_through_the_relay_and_workers_ends_as_one_by_one(db, sql, sandbox, broker, worker, relay):
    # Final answers only: a pending payment's next polls would run meanwhile (the worker is live).
    finals = [{"status": "ACSC"}, {"status": "RJCT"}, {"status": "CANC"}, {"status": "ACCP"}]
    alone = [make_payment(sql, sandbox, **finals[i % 4]) for i in range(40)]
    chunked = [make_payment(sql, sandbox, **finals[i % 4]) for i in range(40)]
    for p in alone:
        poll_payment(p["id"])
    enqueue_polls(chunked)
    wait_for(lambda: open_rows(sql) == 0, timeout=60, what="every poll row done")
    assert effects(sql, chunked) == effects(sql, alone)


def test_a_worker_killed_mid_chunk_loses_nothing_and_doubles_nothing(db, sql, sandbox, broker, redis_namespace,
                                                                    tmp_path):
    """SIGKILL while the chunk's apply transaction is open (held there by a slow trigger): PostgreSQL
    rolls it back, CrashGuard's redelivery runs the chunk again in a second worker, each effect once."""
    import os

    from tests.jobs.test_recovery import kill_mid_audit_insert, start_worker, stop

    ps = [make_payment(sql, sandbox, status="ACSC") for _ in range(30)]
    env = {k: os.environ[k] for k in ("NEONOMICS_API_URL", "NEONOMICS_CLIENT_ID", "NEONOMICS_CLIENT_SECRET")}
    kill_mid_audit_insert(sql, db, redis_namespace, tmp_path, lambda: enqueue_polls(ps), **env)
    env["DROP_WORKER_HEARTBEAT_TIMEOUT_MS"] = "2000"
    assert sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL")[0]["n"] == 0
    assert all(tx(sql, p["id"])["status"] == "processing" for p in ps)
    reads_before = sandbox.count("neonomics.status")
    second = start_worker(db, redis_namespace, tmp_path, **env)
    try:
        wait_for(lambda: open_rows(sql) == 0, timeout=90, what="every poll done after the kill")
    finally:
        stop(second)
    for p in ps:
        assert tx(sql, p["id"])["status"] == "completed" and tx(sql, p["id"])["poll_count"] == 1
        assert len(notifications(sql, p["user_id"])) == 1
        assert [a["action"] for a in audits(sql, p["id"])] == ["payment_completed"]
        assert balance(sql, p["account_id"]) == B0 - AMOUNT
    # The killed chunk's reads were made again, once each: nothing of theirs had been committed.
    assert sandbox.count("neonomics.status") == reads_before + len(ps)
