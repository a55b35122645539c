"""Two real scheduler processes: one leads; SIGKILL it and the standby takes over within 30 s."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.conftest import BASE_REDIS_URL, wait_for

ROOT = Path(__file__).resolve().parents[1]


def start_scheduler(db_url: str, namespace: str, log: Path, metrics_port: int = 0) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "DROP_REDIS_NAMESPACE": namespace,
        "DROP_SCHEDULER_METRICS_PORT": str(metrics_port),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "scheduler.py"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def leader_pid(namespace: str) -> int | None:
    raw = redis.Redis.from_url(BASE_REDIS_URL).get(f"{namespace}:scheduler:leader")
    if raw is None:
        return None
    return int(json.loads(raw)["leader"].split(":")[1])


def test_standby_takes_over_after_the_leader_is_killed(db, sql, redis_namespace, tmp_path):
    first = start_scheduler(db, redis_namespace, tmp_path / "a.log")
    second = None
    try:
        wait_for(lambda: leader_pid(redis_namespace) == first.pid, timeout=30, what="first leader")
        second = start_scheduler(db, redis_namespace, tmp_path / "b.log")
        time.sleep(6)  # the standby has had its chance to grab the lease, and must not have
        assert leader_pid(redis_namespace) == first.pid
        os.killpg(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: leader_pid(redis_namespace) == second.pid, timeout=30, what="standby leads")
        takeover = time.monotonic() - killed
        print(f"standby took over {takeover:.1f} s after SIGKILL")
        assert takeover <= 30
        # Every fire was made by one replica at a time: one row per (job, slot), by construction
        # (primary key), and each has exactly one outbox row with the slot's key.
        fires = sql("SELECT job, slot, outbox_id FROM scheduler_fires WHERE status = 'fired'")
        keys = sql("SELECT idempotency_key FROM job_outbox WHERE idempotency_key LIKE 'drop:schedule:%%'")
        assert len(fires) == len(keys) >= 1
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_scheduler_exports_only_its_own_metric_families_and_logs_no_apscheduler_chatter(
        db, sql, redis_namespace, tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.monitoring.conftest import free_port

    port = free_port()
    proc = start_scheduler(db, redis_namespace, tmp_path / "s.log", metrics_port=port)
    try:
        def scrape() -> set[str] | None:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                return None
            names = {f.name for f in text_string_to_metric_families(text)}
            return names if "drop_scheduler_is_leader" in names else None

        families = wait_for(scrape, timeout=30, what="the scheduler's metrics")
        wait_for(lambda: b"is now the scheduler leader" in (tmp_path / "s.log").read_bytes(), timeout=30,
                 what="leadership")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    own = {name for name in families if not name.startswith(("process_", "python_"))}
    # worker families (job metrics, the PISP breaker gauge) are the workers' to export
    assert own == {"drop_scheduler_is_leader", "drop_scheduler_heartbeat_timestamp_seconds",
                   "drop_scheduler_last_fire_timestamp_seconds"}, own
    assert "process_resident_memory_bytes" in families
    log = (tmp_path / "s.log").read_text()
    assert "apscheduler" not in log, log
