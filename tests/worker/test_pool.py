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


def start_pool(db_url: str, namespace: str, tmp_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "DROP_REDIS_NAMESPACE": namespace,
        "DROP_DATA_DIR": str(tmp_path),
        "DROP_WORKER_METRICS_PORT": "0",
        "PYTHONPATH": str(ROOT),
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
    return [p for p in wrapper.children(recursive=True) if "dramatiq" in " ".join(p.cmdline())]


def start_pool_and_wait(db_url: str, namespace: str, tmp_path: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start the pool and wait until the Dramatiq master, its worker and its forks are up."""
    proc = start_pool(db_url, namespace, tmp_path)
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
