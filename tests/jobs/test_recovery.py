"""Recovery: Redis loss, SIGKILLed workers, poison messages — nothing lost, nothing doubled."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

import jobs
from tests.conftest import BASE_REDIS_URL, wait_for
from tests.worker import crash_actors  # noqa: F401  (declares the actors on the test broker)
from worker import dramatiq_redis
from worker.relay import check_broker_epoch, relay_once

ROOT = Path(__file__).resolve().parents[2]


def lose_redis(namespace: str) -> None:
    """What FLUSHALL / a restart without persistence does, limited to this test's namespace."""
    client = redis.Redis.from_url(BASE_REDIS_URL)
    for pattern in (f"{namespace}:*", f"{namespace}-dramatiq:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(db_url: str, namespace: str, tmp_path: Path, **env: str) -> subprocess.Popen:
    environment = {
        **os.environ,
        "DATABASE_URL": db_url,
        "DROP_REDIS_NAMESPACE": namespace,
        "DROP_DATA_DIR": str(tmp_path),
        "dramatiq_prom_port": str(free_port()),
        "dramatiq_prom_db": str(tmp_path / "prom"),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "jobs.app", "tests.worker.crash_actors",
         "--processes", "1", "--threads", "2"],
        cwd=ROOT,
        env=environment,
        start_new_session=True,
        stdout=open(tmp_path / "worker.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_mid_audit_insert(sql, db_url: str, namespace: str, tmp_path: Path, enqueue, **env: str) -> None:
    """Hold a worker's transaction open at its audit_log insert (a slow statement trigger), SIGKILL
    the worker there, drop the trigger: what a crash mid-chunk leaves for the redelivery."""
    sql("""CREATE FUNCTION slow_audit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$""")
    sql("CREATE TRIGGER slow_audit AFTER INSERT ON audit_log FOR EACH STATEMENT EXECUTE FUNCTION slow_audit()")
    enqueue()
    first = start_worker(db_url, namespace, tmp_path, DROP_WORKER_HEARTBEAT_TIMEOUT_MS="2000", **env)
    try:
        wait_for(lambda: sql("SELECT 1 FROM pg_stat_activity WHERE state = 'active' "
                             "AND query LIKE 'INSERT INTO audit_log%%'"), timeout=60, what="a job mid-transaction")
    finally:
        stop(first, signal.SIGKILL)
    sql("DROP TRIGGER slow_audit ON audit_log")


def effects(sql) -> dict[int, int]:
    rows = sql("SELECT (details->>'n')::int AS n, count(*) AS c FROM audit_log WHERE action = 'test.effect' GROUP BY 1")
    return {r["n"]: r["c"] for r in rows}


def test_redis_loss_is_noticed_and_every_pending_job_is_sent_again(db, sql, broker, redis_namespace):
    for n in range(20):
        jobs.enqueue("test.slow_effect", {"n": n})
    check_broker_epoch()  # the relay's first pass records the epoch
    assert relay_once().sent == 20
    assert relay_once().sent == 0
    lose_redis(redis_namespace)
    assert check_broker_epoch() == 20  # noticed on the next pass, not after REDELIVER_AFTER
    assert relay_once().sent == 20
    assert check_broker_epoch() == 0


def test_redis_loss_mid_run_loses_nothing_and_doubles_nothing(db, sql, broker, redis_namespace, tmp_path):
    for n in range(30):
        jobs.enqueue("test.slow_effect", {"n": n, "seconds": 0.05})
    proc = start_worker(db, redis_namespace, tmp_path)
    try:
        wait_for(lambda: len(effects(sql)) >= 5, timeout=30, what="some effects")
        lose_redis(redis_namespace)  # mid-run: queued and delayed messages vanish
        started = time.monotonic()
        wait_for(lambda: len(effects(sql)) == 30, timeout=60, what="all effects after Redis loss")
        recovered_in = time.monotonic() - started
    finally:
        stop(proc)
    assert set(effects(sql).values()) == {1}  # each effect exactly once
    assert sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NULL")[0]["n"] == 0
    print(f"recovered from Redis loss in {recovered_in:.1f} s")
    assert recovered_in < 30


def test_sigkilled_worker_messages_are_redelivered_within_30s(db, sql, broker, redis_namespace, tmp_path):
    jobs.enqueue("test.slow_effect", {"n": 1, "seconds": 4})
    first = start_worker(db, redis_namespace, tmp_path)
    wait_for(lambda: sql("SELECT relayed_at FROM job_outbox")[0]["relayed_at"], timeout=30, what="relayed")
    # In flight, not merely queued: the worker has taken it (its ack set holds it) and the job
    # sleeps 4 s before its effect, so the kill below leaves it with the dead worker.
    client = redis.Redis.from_url(BASE_REDIS_URL)

    def in_flight() -> int:
        stats = dramatiq_redis.queue_stats(client, f"{redis_namespace}-dramatiq", ["crash"])
        return stats[0]["in_flight"]

    wait_for(lambda: in_flight() == 1, timeout=30, what="the job taken by the first worker")
    stop(first, signal.SIGKILL)
    killed_at = time.monotonic()
    assert effects(sql) == {}
    second = start_worker(db, redis_namespace, tmp_path)
    try:
        wait_for(lambda: effects(sql) == {1: 1}, timeout=45, what="redelivered effect")
        redelivered_in = time.monotonic() - killed_at
    finally:
        stop(second)
    print(f"redelivered {redelivered_in:.1f} s after SIGKILL (includes the job's 4 s)")
    assert redelivered_in <= 30


def test_a_message_that_keeps_killing_its_worker_ends_in_the_dead_letters(db, sql, broker, redis_namespace, tmp_path):
    jobs.enqueue("test.poison", {})
    crashes = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not sql("SELECT 1 FROM dead_letters"):
        proc = start_worker(db, redis_namespace, tmp_path, DROP_WORKER_HEARTBEAT_TIMEOUT_MS="2000")
        try:
            proc.wait(timeout=15)  # the poison message kills the worker process; Dramatiq then exits
            crashes += 1
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop(proc)
    rows = sql("SELECT job, reason FROM dead_letters")
    assert rows == [{"job": "test.poison", "reason": "killed its worker 3 times (SIGKILL/OOM/segfault); not run again"}]
    assert 3 <= crashes <= 4
    outbox = sql("SELECT done_at, error FROM job_outbox")[0]
    assert outbox["done_at"] is None and outbox["error"].startswith("dead-lettered: killed its worker")


@pytest.mark.parametrize("dummy", [0])
def test_redelivery_bound_is_documented(dummy):
    from worker.redelivery import MAINTENANCE_INTERVAL_S
    from worker.settings import get_settings

    assert get_settings().worker_heartbeat_timeout_ms / 1000 + MAINTENANCE_INTERVAL_S <= 30
