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


def start_scheduler(db_url: str, namespace: str, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "DROP_REDIS_NAMESPACE": namespace,
        "DROP_SCHEDULER_METRICS_PORT": "0",
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
