"""One psycopg 3 connection pool per process.

Connections are checked before use, so a PostgreSQL restart costs a retry, not a dead pool.
`transaction()` is the normal way in: one transaction, committed on success, rolled back on
any exception.

db/ is the lowest layer, so it does not read settings itself: worker.settings hands it a
`PoolConfig` source when it is imported (`configure`), and every process imports settings first.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool


@dataclass(frozen=True)
class PoolConfig:
    database_url: str | None
    max_size: int
    connect_timeout_s: int = 5
    statement_timeout_ms: int = 30_000


def connection_options(url: str, config: PoolConfig | None = None) -> dict[str, Any]:
    """Options for every connection drop-worker opens: bounded connects, TCP keepalives (a
    vanished server or a network cut is noticed in ~25 s, not after the kernel's 2 h) and a
    statement timeout (no statement holds a connection and its locks for ever). What the URL
    sets itself wins; its own `options` are kept. With a multi-host URL
    (`postgresql://h1,h2/db?target_session_attrs=read-write`) libpq tries each host in turn
    and keeps the writable one, so a failover to a second address needs no restart."""

    config = config or _config()
    given = conninfo_to_dict(url)
    options: dict[str, Any] = {
        "connect_timeout": config.connect_timeout_s, "keepalives": 1, "keepalives_idle": 10,
        "keepalives_interval": 5, "keepalives_count": 3,
    }
    options = {k: v for k, v in options.items() if k not in given}
    # Server side: the backend of a client that vanished (a host cut off the network) is ended
    # within ~11 s by keepalives, and with it the row locks and advisory locks (the scheduler's
    # lease) it held; a transaction left idle (a provider call is bounded by 30 s) after 2 min.
    server = {"statement_timeout": config.statement_timeout_ms, "tcp_keepalives_idle": 5,
              "tcp_keepalives_interval": 2, "tcp_keepalives_count": 3,
              "idle_in_transaction_session_timeout": 120_000}
    own = str(given.get("options", ""))
    extra = " ".join(f"-c {name}={value}" for name, value in server.items() if name not in own)
    if extra:
        options["options"] = f"{own} {extra}".strip()
    return options


# Every connection drop-worker opens returns rows as dicts.
Conn = psycopg.Connection[DictRow]
AsyncConn = psycopg.AsyncConnection[DictRow]
ASYNC_POOL_SIZE = 10

_config_source: Callable[[], PoolConfig] | None = None
_lock = threading.Lock()
_pool: ConnectionPool[Conn] | None = None
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


def get_pool() -> ConnectionPool[Conn]:
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            # A pool inherited through fork shares sockets with the parent: start a fresh one.
            url = database_url()
            _pool = ConnectionPool(
                url,
                min_size=1,
                max_size=_config().max_size,
                kwargs={"row_factory": dict_row, **connection_options(url)},
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


def one_row(row: dict[str, Any] | None) -> dict[str, Any]:
    """The row of a statement that always returns one (an aggregate, `RETURNING` of an insert
    that cannot conflict); None here is a bug, not a case to handle."""
    if row is None:
        raise RuntimeError("a statement that always returns a row returned none")
    return row


@contextmanager
def transaction() -> Iterator[Conn]:
    """A pooled connection inside one transaction (commit on success, rollback on error)."""
    with get_pool().connection() as conn, conn.transaction():
        yield conn


def connect(**kwargs: Any) -> Conn:
    """A dedicated connection outside the pool (LISTEN, advisory-lock leases, migrations)."""
    url = database_url()
    return psycopg.connect(url, row_factory=dict_row, **{**connection_options(url), **kwargs})


# --- async: one pool per (process, event loop, database URL) ---------------------------------
# Async jobs (AISP) run on Dramatiq's event loop; a pool belongs to the loop that opened it.

_async_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                        tuple[tuple[int, str], asyncio.Task[AsyncConnectionPool[AsyncConn]]]] = (
    weakref.WeakKeyDictionary()
)


async def _open_async_pool(url: str, name: str) -> AsyncConnectionPool[AsyncConn]:
    # Autocommit: each statement is one transaction and one round trip.
    pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
        url, min_size=1, max_size=ASYNC_POOL_SIZE, open=False, timeout=30, name=name,
        kwargs={"autocommit": True, "row_factory": dict_row, **connection_options(url)},
    )
    await pool.open()
    return pool


async def get_async_pool(*, name: str = "drop-worker-async") -> AsyncConnectionPool[AsyncConn]:
    """This event loop's autocommit pool (opened once, shared by the loop's coroutines)."""
    loop = asyncio.get_running_loop()
    key = (os.getpid(), database_url())
    entry = _async_pools.get(loop)
    if entry is None or entry[0] != key:
        entry = (key, loop.create_task(_open_async_pool(key[1], name)))
        _async_pools[loop] = entry
    return await asyncio.shield(entry[1])


async def close_async_pool() -> None:
    entry = _async_pools.pop(asyncio.get_running_loop(), None)
    if entry is not None:
        pool = await entry[1]
        await pool.close()
