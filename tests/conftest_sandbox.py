"""pytest plugin: the `sandbox` fixture (the provider simulator over real HTTP).

One sandbox process per test session (`python -m sandbox --port 0`, a free loopback port);
every test that asks for `sandbox` gets it reset, with NEONOMICS_*/SUMSUB_* pointing at it and
matching credentials, fresh provider clients and breakers (its own Redis namespace through
tests/conftest.py). If the test also uses `db`, emitted webhooks land in that test's
job_outbox.

    def test_x(sandbox):
        sandbox.fault("neonomics.balances", status=503, count=2)
        get_neonomics().get_balances("acc-1", "consent-1")
        assert sandbox.count("neonomics.balances") == 1
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.admin import SandboxAdmin

SANDBOX_ENV = {
    "NEONOMICS_CLIENT_ID": "drop-sandbox-client",
    "NEONOMICS_CLIENT_SECRET": "drop-sandbox-secret",
    "SUMSUB_APP_TOKEN": "sbx:drop-sandbox-app-token",
    "SUMSUB_SECRET_KEY": "drop-sandbox-sumsub-secret",
    "SUMSUB_WEBHOOK_SECRET": "drop-sandbox-webhook-secret",
}
ROOT = Path(__file__).resolve().parent.parent


class SandboxProcess:
    def __init__(self) -> None:
        env = {**os.environ, **SANDBOX_ENV, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        # Keep draining the pipe so the sandbox's logging never blocks on a full pipe.
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        self.url = ""
        try:
            while not self.url:
                line = lines.get(timeout=20)
                if line.startswith("sandbox listening on "):
                    self.url = line.split()[-1]
        except queue.Empty:
            self.stop()
            raise RuntimeError("sandbox did not start within 20 s") from None

    def _pump(self, lines: queue.Queue[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.put(line.strip())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def sandbox_process() -> Iterator[SandboxProcess]:
    process = SandboxProcess()
    yield process
    process.stop()


@pytest.fixture
def sandbox(request, sandbox_process, redis_namespace, monkeypatch) -> Iterator[SandboxAdmin]:
    from worker.breaker import reset_breakers
    from worker.providers import reset_clients
    from worker.settings import get_settings

    if "db" in request.fixturenames:
        request.getfixturevalue("db")  # webhooks go to this test's schema
    url = sandbox_process.url
    for name, value in {**SANDBOX_ENV, "NEONOMICS_API_URL": url, "SUMSUB_API_URL": url}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    reset_clients()
    reset_breakers()
    admin = SandboxAdmin(url)
    admin.reset(
        client_id=SANDBOX_ENV["NEONOMICS_CLIENT_ID"],
        client_secret=SANDBOX_ENV["NEONOMICS_CLIENT_SECRET"],
        sumsub_app_token=SANDBOX_ENV["SUMSUB_APP_TOKEN"],
        sumsub_secret_key=SANDBOX_ENV["SUMSUB_SECRET_KEY"],
        webhook_secret=SANDBOX_ENV["SUMSUB_WEBHOOK_SECRET"],
        database_url=os.environ.get("DATABASE_URL") if "db" in request.fixturenames else None,
    )
    yield admin
    admin.reset()  # cancels pending reviews and hung requests' state
    admin.close()
    reset_clients()
    reset_breakers()
