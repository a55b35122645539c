"""The Procfile's worker entry point: one graceful signal, and never an orphaned pool."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def start_pool(db_url: str, namespace: str, tmp_path: Path, **extra_env: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "DROP_REDIS_NAMESPACE": namespace,
        "DROP_DATA_DIR": str(tmp_path),
        "DROP_WORKER_METRICS_PORT": "0",
        "PYTHONPATH": str(ROOT),
        **extra_env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "worker.pool", "--processes", "1", "--threads", "2"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=open(tmp_path / "pool.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def dramatiq_tree(wrapper: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in wrapper.children(recursive=True):
        try:
            if "dramatiq" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:  # a short-lived child (a fork starting up) already gone
            pass
    return found


def start_pool_and_wait(db_url: str, namespace: str, tmp_path: Path,
                        **extra_env: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start the pool and wait until the Dramatiq master, its worker and its forks are up."""
    proc = start_pool(db_url, namespace, tmp_path, **extra_env)
    wrapper = psutil.Process(proc.pid)
    tree = wait_for(
        lambda: len(dramatiq_tree(wrapper)) >= 3 and dramatiq_tree(wrapper),
        timeout=60,
        what="dramatiq master, worker and forks",
    )
    return proc, tree


def test_sigterm_stops_the_whole_pool_gracefully(db, redis_namespace, tmp_path):
    proc, tree = start_pool_and_wait(db, redis_namespace, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=45) == 0
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_wrapper_never_leaves_an_orphaned_pool(db, redis_namespace, tmp_path):
    proc, tree = start_pool_and_wait(db, redis_namespace, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # e.g. the process manager's kill timeout
    proc.wait()
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
        time.sleep(0.2)
    survivors = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


def test_one_start_and_one_stop_message_per_pool(db, redis_namespace, tmp_path, monkeypatch):
    from tests.monitoring.conftest import Receiver, _start_receiver

    receiver = Receiver()
    receiver.server = _start_receiver(receiver)
    try:
        monkeypatch.setenv("SLACK_WEBHOOK_URL", f"{receiver.url}/services/T000/B000/secret-token")
        monkeypatch.setenv("DROP_SLACK_MIN_INTERVAL_S", "0.05")
        proc, _ = start_pool_and_wait(db, redis_namespace, tmp_path)  # 1 process: the wrapper's one message
        started = receiver.wait(1, timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=45) == 0
        texts = [r.json()["text"] for r in receiver.wait(2, timeout=20)]
        assert len(started) >= 1 and "Worker started" in texts[0] and "Worker pool started" in texts[0]
        assert "Worker shutting down" in texts[1] and "SIGTERM received" in texts[1]
        time.sleep(0.5)  # nothing else arrives: no message per worker process
        assert len(receiver.requests) == 2
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def _stopped_pool_log(db, redis_namespace, tmp_path, **extra_env: str) -> list[str]:
    proc, _ = start_pool_and_wait(db, redis_namespace, tmp_path, **extra_env)
    wait_for(lambda: b"outbox relay started" in (tmp_path / "pool.log").read_bytes()
             or extra_env.get("DROP_LOG_LEVEL") == "WARNING", timeout=30, what="the relay's first line")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=45) == 0
    return [line for line in (tmp_path / "pool.log").read_text().splitlines() if line.strip()]


def test_every_process_of_the_pool_logs_one_json_format_outside_development(db, redis_namespace, tmp_path):
    import json

    lines = _stopped_pool_log(db, redis_namespace, tmp_path, DROP_ENV="staging")
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line[:200]}") from None
    loggers = {e["logger"] for e in entries}
    # Dramatiq's master, its worker process and its forks, and the project's own relay
    assert {"dramatiq.MainProcess", "dramatiq.WorkerProcess(0)", "worker.relay"} <= loggers, loggers
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)


def test_the_pool_honours_the_log_level(db, redis_namespace, tmp_path):
    lines = _stopped_pool_log(db, redis_namespace, tmp_path, DROP_LOG_LEVEL="WARNING")
    assert not [line for line in lines if " INFO " in line or "[INFO]" in line], lines[:5]
