"""The cross-language enqueue contract, from a real Node.js client (node-postgres)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_for

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture(scope="module")
def node_pg() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js/npm not installed: the web tier's client cannot be exercised here")
    if not (NODE_DIR / "node_modules" / "pg").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True, timeout=300)
    return NODE_DIR


SECRET = "node-contract-secret"


@pytest.fixture
def node_secret(monkeypatch):
    """The webhook secret, set before the worker starts: a worker thread reading settings while
    the cache is cleared could otherwise store the settings read before the change."""
    monkeypatch.setenv("SUMSUB_WEBHOOK_SECRET", SECRET)
    from worker.settings import get_settings

    get_settings.cache_clear()
    return SECRET


def test_a_typescript_style_enqueue_is_processed(node_pg, node_secret, db, sql, worker, relay):
    secret = node_secret
    env = {**os.environ, "DATABASE_URL": db, "SUMSUB_WEBHOOK_SECRET": secret}
    out = subprocess.run(
        ["node", "enqueue.js", "web_user_1", "applicant_node_1"],
        cwd=node_pg,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outbox_id = json.loads(out.stdout)["outbox_id"]
    assert isinstance(outbox_id, int)

    wait_for(
        lambda: sql("SELECT done_at FROM job_outbox WHERE id = %s", (outbox_id,))[0]["done_at"],
        timeout=30,
        what="the webhook job to finish",
    )
    assert sql("SELECT kyc_status FROM users WHERE id = 'web_user_1'")[0]["kyc_status"] == "approved"
    assert [r["message"] for r in sql("SELECT message FROM notifications WHERE user_id = 'web_user_1'")] == [
        "Du er nå verifisert"
    ]
