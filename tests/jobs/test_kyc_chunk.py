"""kyc.sumsub_webhook_chunk: many webhooks in one transaction, each row's outcome exactly as if it
had run alone (against real PostgreSQL; the relay's chunking and an end-to-end run through it)."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

import jobs
from jobs.kyc import CHUNK_JOB, WEBHOOK_JOB, process_chunk, process_webhook
from tests.conftest import wait_for
from tests.jobs.test_kyc import APPLICANT, BASE, TEST_SECRET, USER, add_user, event, signed

USERS = [(USER, APPLICANT), ("usr_two", "app_two"), ("usr_three", "app_three")]
KINDS = ["GREEN", "RETRY", "FINAL", "applicantPending", "applicantOnHold", "GREEN"]


def scenario(seed: int, n: int = 24) -> list[dict]:
    """Signed webhooks for three applicants: times out of order, Sumsub's resends (same body)."""
    rnd = random.Random(seed)
    out: list[dict] = []
    for _ in range(n):
        if out and rnd.random() < 0.2:
            out.append(rnd.choice(out))  # a resend: byte-identical
            continue
        _, applicant = rnd.choice(USERS)
        at = BASE + timedelta(seconds=rnd.randint(0, 40))
        out.append(signed(event(rnd.choice(KINDS), at=at, applicant=applicant)))
    return out


def state(sql) -> dict:
    """Everything a webhook can change, request ids aside (they differ between runs by design)."""
    def strip(details: dict) -> dict:
        return {k: v for k, v in details.items() if k != "request_id"}

    return {
        "users": sql("SELECT id, kyc_status, kyc_event_at, kyc_event_id FROM users ORDER BY id"),
        "audit": [(r["user_id"], r["action"], strip(r["details"]))
                  for r in sql("SELECT user_id, action, details FROM audit_log ORDER BY id")],
        "notifications": sql("SELECT user_id, kind, message FROM notifications ORDER BY id"),
        "screening": sql("SELECT user_id, result, provider_event_id, review_answer, reject_type, reject_labels "
                         "FROM screening_results ORDER BY id"),
        "processed": sorted(r["event_id"] for r in sql("SELECT event_id FROM processed_events")),
        "aml_jobs": sorted(r["k"] for r in sql("SELECT idempotency_key AS k FROM job_outbox "
                                               "WHERE job = 'kyc.aml_check'")),
    }


def reset(sql) -> None:
    sql("TRUNCATE processed_events, audit_log, notifications, screening_results, job_outbox")
    sql("UPDATE users SET kyc_status = 'pending', kyc_event_at = NULL, kyc_event_id = NULL")


def outbox_rows(payloads: list[dict]) -> list[int]:
    """One row per webhook (the enqueue contract), committed together: one relay pass sees them all."""
    from db.pool import transaction

    with transaction() as conn:
        return [jobs.enqueue(WEBHOOK_JOB, p, idempotency_key=f"chunk-test-{i}", conn=conn)
                for i, p in enumerate(payloads)]


@pytest.fixture
def users(sql, monkeypatch):
    from worker.settings import get_settings

    monkeypatch.setenv("SUMSUB_WEBHOOK_SECRET", TEST_SECRET)
    get_settings.cache_clear()
    for user_id, applicant in USERS:
        add_user(sql, user_id, applicant)


@pytest.mark.parametrize("seed", range(6))
def test_a_chunk_leaves_exactly_what_the_same_webhooks_one_by_one_leave(sql, users, broker, seed):
    payloads = scenario(seed)
    for p in payloads:  # today's path, in delivery (outbox id) order
        process_webhook(**p)
    alone = state(sql)
    reset(sql)
    ids = outbox_rows(payloads)
    outcomes = process_chunk(ids)
    assert state(sql) == alone
    assert set(outcomes) == set(ids) and "alone" not in outcomes.values()
    assert sql("SELECT count(*) AS n FROM job_outbox WHERE job = %s AND done_at IS NULL", (WEBHOOK_JOB,))[0]["n"] == 0


def test_events_of_one_applicant_keep_their_order_inside_a_chunk(sql, users, broker):
    newer, older = BASE + timedelta(seconds=30), BASE
    ids = outbox_rows([signed(event("GREEN", at=newer)), signed(event("RETRY", at=older)),
                       signed(event("applicantPending", at=older))])
    outcomes = process_chunk(ids)
    assert [outcomes[i] for i in ids] == ["applied", "superseded", "audit_only"]
    assert sql("SELECT kyc_status FROM users WHERE id = %s", (USER,))[0]["kyc_status"] == "approved"
    assert [r["kind"] for r in sql("SELECT kind FROM notifications")] == ["kyc_approved"]


def test_duplicates_in_a_chunk_and_across_chunks_change_nothing(sql, users, broker):
    green = signed(event("GREEN"))
    first = outbox_rows([green, green])
    assert sorted(process_chunk(first).values()) == ["applied", "duplicate"]
    before = state(sql)
    again = [jobs.enqueue(WEBHOOK_JOB, green, idempotency_key="resend-later")]
    assert process_chunk(again) == {again[0]: "duplicate"}
    assert process_chunk(first) == {}  # a redelivered chunk: its rows are done, nothing runs
    after = state(sql)
    assert after["users"] == before["users"] and after["notifications"] == before["notifications"]
    assert after["audit"] == before["audit"]


def test_a_bad_row_runs_alone_to_its_own_outcome_and_the_others_commit(sql, users, broker, worker):
    good = [signed(event("GREEN", applicant=a)) for _, a in USERS]
    forged = signed(event("GREEN"), key="not-the-secret")
    unknown = signed(event("GREEN", applicant="app_nobody"))
    malformed = signed("{not json")
    ids = outbox_rows([good[0], forged, good[1], unknown, malformed, good[2]])
    outcomes = process_chunk(ids)
    assert [outcomes[i] for i in ids] == ["applied", "alone", "applied", "alone", "alone", "applied"]
    # The three alone rows run as single jobs: exactly today's outcomes.
    wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE job = %s AND done_at IS NULL "
                         "AND error IS NULL", (WEBHOOK_JOB,))[0]["n"] == 0, timeout=30, what="the alone rows")
    rows = {r["id"]: r for r in sql("SELECT id, done_at, error FROM job_outbox")}
    assert rows[ids[1]]["done_at"] is not None  # forged: a recorded rejection
    assert sql("SELECT count(*) AS n FROM audit_log WHERE action = 'kyc.webhook_rejected'")[0]["n"] == 1
    dead = {r["outbox_id"]: r["reason"] for r in sql("SELECT outbox_id, reason FROM dead_letters")}
    assert set(dead) == {ids[3], ids[4]} and "applicant" in dead[ids[3]]
    assert all(rows[i]["error"].startswith("dead-lettered") for i in (ids[3], ids[4]))
    assert {r["kyc_status"] for r in sql("SELECT kyc_status FROM users")} == {"approved"}
    assert sql("SELECT count(*) AS n FROM processed_events")[0]["n"] == 3  # the unknown one left none


def test_a_chunk_that_fails_before_its_commit_leaves_every_row_as_it_was(sql, users, broker, monkeypatch):
    import psycopg

    import jobs.kyc as kyc

    payloads = scenario(1, n=10)
    ids = outbox_rows(payloads)

    def lost(conn, outbox_ids):  # the chunk's last statement: every effect was already written
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(kyc.outbox, "mark_done_many", lost)
    with pytest.raises(psycopg.OperationalError):  # transient: Dramatiq retries the chunk
        process_chunk(ids)
    assert sql("SELECT count(*) AS n FROM processed_events")[0]["n"] == 0
    assert sql("SELECT count(*) AS n FROM audit_log")[0]["n"] == 0
    monkeypatch.undo()
    process_chunk(ids)  # the retry: everything once
    with_chunk = state(sql)
    reset(sql)
    for p in payloads:
        process_webhook(**p)
    assert state(sql) == with_chunk


def test_a_chunk_that_cannot_commit_for_good_runs_each_row_alone(sql, users, broker, worker, monkeypatch):
    import jobs.kyc as kyc

    payloads = scenario(4, n=8)
    ids = outbox_rows(payloads)
    def bug(conn, outbox_ids):  # a bug only the chunk path has, not a bad row
        raise ValueError("chunk bookkeeping broke")

    monkeypatch.setattr(kyc.outbox, "mark_done_many", bug)
    assert process_chunk(ids) == {}
    wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE job = %s AND done_at IS NULL",
                         (WEBHOOK_JOB,))[0]["n"] == 0, timeout=30, what="each row run alone")
    alone_state = state(sql)
    reset(sql)
    for p in payloads:
        process_webhook(**p)
    # Single jobs run concurrently (as they always did): which of an applicant's events came first
    # may differ (and so which of two equally old ones wins), the newest event time and the set
    # of events seen may not.
    def newest(st: dict) -> list:
        return [(u["id"], u["kyc_event_at"]) for u in st["users"]]

    now = state(sql)
    assert now["processed"] == alone_state["processed"] and newest(now) == newest(alone_state)


def test_the_relay_sends_due_webhooks_as_chunks_and_a_lone_one_as_itself(sql, users, broker):
    from worker.relay import relay_once

    ns = broker.namespace
    outbox_rows(scenario(2, n=5))
    assert relay_once().sent == 5
    [only] = broker.client.hvals(f"{ns}:{'kyc'}.msgs")
    import dramatiq

    message = dramatiq.Message.decode(only)
    assert message.actor_name == CHUNK_JOB and len(message.kwargs["outbox_ids"]) == 5
    broker.flush_all()
    jobs.enqueue(WEBHOOK_JOB, signed(event("GREEN")), idempotency_key="lone")
    assert relay_once().sent == 1
    [lone] = [dramatiq.Message.decode(m) for m in broker.client.hvals(f"{ns}:kyc.msgs")]
    assert lone.actor_name == WEBHOOK_JOB and lone.options["outbox_id"]  # no wait for a chunk to fill


def test_a_burst_through_the_relay_and_workers_ends_as_one_by_one(sql, users, broker, worker, relay):
    payloads = scenario(3, n=60)
    for p in payloads:
        process_webhook(**p)
    alone = state(sql)
    reset(sql)
    outbox_rows(payloads)
    wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE job = %s AND done_at IS NULL",
                         (WEBHOOK_JOB,))[0]["n"] == 0, timeout=60, what="every webhook row done")
    assert state(sql) == alone


def test_a_worker_killed_mid_chunk_loses_nothing_and_doubles_nothing(sql, db, users, broker, redis_namespace,
                                                                    tmp_path):
    """SIGKILL while the chunk's transaction is open (held there by a slow trigger): PostgreSQL rolls
    it back, CrashGuard's redelivery runs the chunk again in a second worker, each effect once."""

    from tests.jobs.test_recovery import kill_mid_audit_insert, start_worker, stop

    payloads = scenario(5, n=40)
    for p in payloads:
        process_webhook(**p)
    alone = state(sql)
    reset(sql)
    env = {"SUMSUB_WEBHOOK_SECRET": TEST_SECRET, "DROP_WORKER_HEARTBEAT_TIMEOUT_MS": "2000"}
    kill_mid_audit_insert(sql, db, redis_namespace, tmp_path, lambda: outbox_rows(payloads),
                          SUMSUB_WEBHOOK_SECRET=TEST_SECRET)
    assert sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL")[0]["n"] == 0
    second = start_worker(db, redis_namespace, tmp_path, **env)
    try:
        wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE job = %s AND done_at IS NULL",
                             (WEBHOOK_JOB,))[0]["n"] == 0, timeout=90, what="every row done after the kill")
    finally:
        stop(second)
    assert state(sql) == alone
