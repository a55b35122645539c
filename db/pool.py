"""One psycopg 3 connection pool per process.

Connections are checked before use, so a PostgreSQL restart costs a retry, not a dead pool.
`transaction()` is the normal way in: one transaction, committed on success, rolled back on
any exception.

db/ is the lowest layer, so it does not read settings itself: worker.settings hands it a
`PoolConfig` source when it is imported (`configure`), and every process imports settings first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool


@dataclass(frozen=True)
class PoolConfig:
    database_url: str | None
    max_size: int


_config_source: Callable[[], PoolConfig] | None = None
_lock = threading.Lock()
_pool: ConnectionPool | None = None
_pool_pid: int | None = None


def configure(source: Callable[[], PoolConfig]) -> None:
    """Where the pool's settings come from (called by worker.settings; read at each new pool)."""
    global _config_source
    _config_source = source


def _config() -> PoolConfig:
    if _config_source is None:
        raise RuntimeError("db.pool is not configured (import worker.settings first)")
    return _config_source()


def database_url() -> str:
    url = _config().database_url
    if not url:
        raise RuntimeError("DATABASE_URL is not set (run through `drop-jobs` or `make run`)")
    return url


def get_pool() -> ConnectionPool:
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            # A pool inherited through fork shares sockets with the parent: start a fresh one.
            _pool = ConnectionPool(
                database_url(),
                min_size=1,
                max_size=_config().max_size,
                kwargs={"row_factory": dict_row},
                check=ConnectionPool.check_connection,
                timeout=10,
                name="drop-worker",
                open=True,
            )
            _pool_pid = os.getpid()
        return _pool


def close_pool() -> None:
    global _pool
    with _lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.close()
        _pool = None


@contextmanager
def transaction() -> Iterator[psycopg.Connection]:
    """A pooled connection inside one transaction (commit on success, rollback on error)."""
    with get_pool().connection() as conn, conn.transaction():
        yield conn


def connect(**kwargs: object) -> psycopg.Connection:
    """A dedicated connection outside the pool (LISTEN, advisory-lock leases, migrations)."""
    return psycopg.connect(database_url(), row_factory=dict_row, **kwargs)  # type: ignore[arg-type]
