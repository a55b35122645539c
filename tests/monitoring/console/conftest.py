"""The console's fixtures: users (Argon2 hashes made once), an in-process monitor with the console
on, a logged-in HTTP client, and dead letters seeded the way the worker records them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

PASSWORDS = {"vera": "viewer-password-1", "otto": "operator-password-1"}
# Personal data a careless page could show: none of it may appear on any page.
PERSON = {"name": "Kari Nordmann", "national_id": "01017012345", "iban": "NO9386011117947",
          "email": "kari.nordmann@example.no"}


@pytest.fixture(scope="session")
def console_users() -> str:
    from monitoring.console.auth import hash_password

    return f"vera:viewer:{hash_password(PASSWORDS['vera'])},otto:operator:{hash_password(PASSWORDS['otto'])}"


@pytest.fixture
def console(db, monkeypatch, console_users) -> Iterator[str]:
    """The monitor's HTTP server (in this process) with the console on; its base URL."""
    from monitoring.server import serve
    from worker.settings import get_settings

    monkeypatch.setenv("DROP_CONSOLE_USERS", console_users)
    get_settings.cache_clear()
    server = serve("127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def log_in(base: str, name: str, password: str | None = None) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=10)
    response = client.post("/console/login", data={"username": name, "password": password or PASSWORDS[name],
                                                   "next": "/console/"})
    assert response.status_code == 303, response.text[:500]
    return client


@pytest.fixture
def seed_dead_letter(db) -> Callable[..., dict[str, Any]]:
    """An outbox row whose job failed for good, recorded as worker.middleware does (db.outbox)."""
    import uuid

    from db import outbox
    from db.pool import transaction

    def seed(job: str = "housekeeping.prune", payload: dict[str, Any] | None = None,
             reason: str = "ValueError: boom", queue: str = "maintenance") -> dict[str, Any]:
        payload = {} if payload is None else payload
        with transaction() as conn:
            outbox_id = outbox.insert(conn, job, payload, f"console-test-{uuid.uuid4().hex}", None)
            message_id = uuid.uuid4().hex
            outbox.record_dead_letter(
                conn, message_id=message_id, job=job, queue=queue, outbox_id=outbox_id, reason=reason, retries=3,
                message={"queue_name": queue, "actor_name": job, "args": [], "kwargs": payload,
                         "options": {"outbox_id": outbox_id}, "message_id": message_id},
            )
            conn.execute("UPDATE job_outbox SET relayed_at = now() WHERE id = %s", (outbox_id,))
            row = conn.execute("SELECT id FROM dead_letters WHERE message_id = %s", (message_id,)).fetchone()
        return {"id": row["id"], "outbox_id": outbox_id}

    return seed
