"""The enqueue contract: jobs.enqueue / raw SQL inserts → relay → broker → job → done."""

import threading
from datetime import timedelta

import psycopg
import pytest

import jobs
from jobs.registry import registry
from tests.conftest import wait_for
from worker.relay import drain, relay_once

SEEN: list[dict] = []


@registry.job("test.record", queue="test", max_retries=0)
def record(n: int, tag: str = "") -> None:
    SEEN.append({"n": n, "tag": tag})


def queue_len(broker, queue="test"):
    return broker.client.llen(f"{broker.namespace}:{queue}")


def test_enqueue_writes_an_outbox_row_once_per_idempotency_key(db, sql):
    first = jobs.enqueue("test.record", {"n": 1}, idempotency_key="k-1")
    again = jobs.enqueue("test.record", {"n": 2}, idempotency_key="k-1")
    assert isinstance(first, int) and again is None
    rows = sql("SELECT job, payload, relayed_at, done_at, error FROM job_outbox")
    assert rows == [{"job": "test.record", "payload": {"n": 1}, "relayed_at": None, "done_at": None, "error": None}]


def test_enqueue_refuses_unknown_jobs_and_non_objects(db):
    with pytest.raises(jobs.UnknownJobError, match=r"no\.such"):
        jobs.enqueue("no.such", {})
    with pytest.raises(TypeError):
        jobs.enqueue("test.record", [1, 2])  # type: ignore[arg-type]


def test_enqueue_in_a_rolled_back_transaction_leaves_no_job(db, sql):
    from db.pool import get_pool

    with pytest.raises(RuntimeError), get_pool().connection() as conn, conn.transaction():
        jobs.enqueue("test.record", {"n": 1}, conn=conn)
        raise RuntimeError("caller's own change failed")
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 0


def test_relay_sends_each_due_row_once_and_marks_it(db, sql, broker):
    for n in range(5):
        jobs.enqueue("test.record", {"n": n})
    assert relay_once().sent == 5
    assert relay_once().sent == 0  # relayed rows are not sent again
    assert queue_len(broker) == 5
    assert sql("SELECT count(*) AS n FROM job_outbox WHERE relayed_at IS NOT NULL AND relay_count = 1")[0]["n"] == 5


def test_concurrent_relays_never_send_a_row_twice(db, sql, broker):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO job_outbox (job, payload, idempotency_key) "
            "SELECT 'test.record', jsonb_build_object('n', g), 'k' || g FROM generate_series(1, 600) g"
        )
    totals: list[int] = []
    threads = [threading.Thread(target=lambda: totals.append(drain(limit=50))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(totals) == 600
    assert queue_len(broker) == 600


def test_unknown_job_and_bad_payload_rows_are_closed_with_the_reason(db, sql, broker):
    sql("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES ('no.such.job', '{}', 'a')")
    sql("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES ('test.record', '[1]', 'b')")
    result = relay_once()
    assert (result.sent, result.rejected) == (0, 2)
    errors = {r["idempotency_key"]: r["error"] for r in sql("SELECT idempotency_key, error FROM job_outbox")}
    assert errors == {"a": "unknown job 'no.such.job'", "b": "payload is not a JSON object"}
    assert relay_once().rejected == 0  # recorded once, not retried forever


def test_available_at_delays_a_job(db, sql, broker):
    jobs.enqueue("test.record", {"n": 1}, delay=timedelta(hours=1))
    assert relay_once().sent == 0
    sql("UPDATE job_outbox SET available_at = now() - interval '1 second'")
    assert relay_once().sent == 1


def test_a_row_relayed_long_ago_but_never_done_is_relayed_again(db, sql, broker):
    jobs.enqueue("test.record", {"n": 1})
    assert relay_once().sent == 1
    broker.flush_all()  # Redis lost the message
    assert relay_once().sent == 0
    sql("UPDATE job_outbox SET relayed_at = now() - interval '11 minutes'")
    assert relay_once().sent == 1
    assert sql("SELECT relay_count FROM job_outbox")[0]["relay_count"] == 2


def test_raw_sql_insert_is_processed_end_to_end(db, sql, worker, relay):
    """Exactly what the web tier does: INSERT in its own transaction, nothing else."""
    SEEN.clear()
    with psycopg.connect(db) as conn, conn.transaction():
        conn.execute("INSERT INTO users (id) VALUES ('web_user')")
        conn.execute(
            "INSERT INTO job_outbox (job, payload, idempotency_key) VALUES ('test.record', %s, 'web:1')",
            ('{"n": 42, "tag": "from-web"}',),
        )
    wait_for(lambda: sql("SELECT done_at FROM job_outbox")[0]["done_at"], what="outbox row done")
    assert SEEN == [{"n": 42, "tag": "from-web"}]


MARKED: list[int] = []


@registry.job("test.marks_itself", queue="test", max_retries=0)
def marks_itself(n: int) -> None:
    from db.pool import transaction
    from worker.context import mark_outbox_done

    with transaction() as conn:
        mark_outbox_done(conn)
    MARKED.append(n)


def test_a_job_that_marks_its_row_saves_the_bookkeeping_transaction(db, sql, worker, relay, monkeypatch):
    import worker.context

    calls: list[int] = []
    monkeypatch.setattr(worker.context, "mark_outbox_done_by_id", lambda outbox_id: calls.append(outbox_id))
    MARKED.clear()
    jobs.enqueue("test.marks_itself", {"n": 1})
    jobs.enqueue("test.record", {"n": 2})
    wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL")[0]["n"] == 1
             and len(calls) == 1, what="both jobs ran")
    assert MARKED == [1]
    record_row = sql("SELECT id FROM job_outbox WHERE job = 'test.record'")[0]["id"]
    assert calls == [record_row]  # only the job that did not mark its own row needed the extra UPDATE
