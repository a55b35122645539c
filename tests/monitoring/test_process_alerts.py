"""The monitor process itself: startup and SIGTERM shutdown alerts reach Slack; it serves health."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import wait_for

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_monitor_sends_startup_and_shutdown_alerts(db, receiver):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DROP_MONITOR_PORT": str(port),
           "SLACK_WEBHOOK_URL": f"{receiver.url}/services/T/B/x", "DROP_MONITOR_EVAL_INTERVAL_S": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "monitoring"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = receiver.wait(1, timeout=20)[0].json()["text"]
        assert started.startswith("ℹ️ Drop Development Alert — Info")
        assert "*Title:* Monitor started" in started and "*Source:* monitor@" in started
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"pisp_circuit_open" in r.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        texts = [r.json()["text"] for r in receiver.requests]
        stop = next(t for t in texts if "shutting down" in t)
        assert "SIGTERM received" in stop
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: proc.poll() is not None, what="monitor exit")
