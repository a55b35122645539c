"""Shared pieces of the benchmarks: a private PostgreSQL schema + Redis namespace, worker
processes started like production, progress polling, RSS sampling, the machine description.

Every benchmark runs against the real servers (DATABASE_URL / REDIS_URL, else the embedded
ones) inside its own schema and namespace, and removes both at the end (as tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import quote

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "bench-webhook-secret"  # a throwaway key for signing bench payloads
# The Procfile's worker shape: `python -m worker.pool --processes 2 --threads 8`.
PROCESSES, THREADS = 2, 8


def with_schema(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-c search_path={schema}')}"


def machine() -> dict[str, str]:
    """What the figures were measured on (printed with every table)."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for dist in ("dramatiq", "celery", "redis", "psycopg", "psycopg-pool", "kombu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    info = {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "ram": f"{mem_gib:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(os.environ["REDIS_URL"])
        info["redis_server"] = client.info("server")["redis_version"]
        client.close()
    with contextlib.suppress(Exception), psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        info["postgres_server"] = conn.execute("SHOW server_version").fetchone()[0]
    return info


def ensure_servers() -> object | None:
    """DATABASE_URL / REDIS_URL from the environment, else the embedded servers (returned, to stop)."""
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        return None
    from worker.embedded import ensure_services

    embedded = ensure_services(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"),
                               Path(tempfile.mkdtemp(prefix="drop-bench-")))
    os.environ["DATABASE_URL"] = embedded.database_url or ""
    os.environ["REDIS_URL"] = embedded.redis_url or ""
    return embedded


@dataclass
class Sandboxed:
    """One benchmark's private schema and namespace, and the environment its processes get."""

    name: str
    base_db: str = ""
    redis_url: str = ""
    schema: str = ""
    namespace: str = ""
    db_url: str = ""
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="drop-bench-")))
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        run_id = uuid.uuid4().hex[:10]
        self.base_db, self.redis_url = os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
        self.schema, self.namespace = f"bench_{self.name}_{run_id}", f"bench{self.name}{run_id}"
        self.db_url = with_schema(self.base_db, self.schema)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": self.db_url, "REDIS_URL": self.redis_url,
                "DROP_REDIS_NAMESPACE": self.namespace, "DROP_DATA_DIR": str(self.data_dir),
                "DROP_ENV": "development", "DROP_WORKER_METRICS_PORT": "0", "DROP_LOG_LEVEL": "WARNING",
                "SUMSUB_WEBHOOK_SECRET": WEBHOOK_SECRET, "BENCH_NAMESPACE": self.namespace}

    def __enter__(self) -> Sandboxed:
        from db.migrate import migrate

        with psycopg.connect(self.base_db, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.schema}"')
        migrate(self.db_url)
        # This process talks to the same schema/namespace (jobs.enqueue, the relay, fan_out).
        self._saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "DROP_REDIS_NAMESPACE", "DROP_DATA_DIR",
                                                      "SUMSUB_WEBHOOK_SECRET")}
        os.environ.update({"DATABASE_URL": self.db_url, "DROP_REDIS_NAMESPACE": self.namespace,
                           "DROP_DATA_DIR": str(self.data_dir), "SUMSUB_WEBHOOK_SECRET": WEBHOOK_SECRET})
        _reset_clients(self.namespace)
        # A running deployment has its broker epoch (worker.relay.check_broker_epoch); without it the
        # relay would take this fresh namespace for a Redis loss and re-send every preloaded message.
        client = redis.Redis.from_url(self.redis_url)
        client.set(f"{self.namespace}:broker:epoch", uuid.uuid4().hex)
        client.close()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        _reset_clients(None)
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with psycopg.connect(self.base_db, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{self.schema}" CASCADE')
        client = redis.Redis.from_url(self.redis_url)
        # (-raw: bench.noop_raw's plain RedisBroker, whose heartbeats were left behind before)
        for pattern in (f"{self.namespace}:*", f"{self.namespace}-dramatiq:*", f"{self.namespace}-celery:*",
                        f"{self.namespace}-raw:*"):
            keys = list(client.scan_iter(match=pattern, count=5000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
        client.close()

    def sql(self, query: str, params: object = None) -> list[tuple]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def start(self, argv: list[str], log_name: str, **extra_env: str) -> subprocess.Popen:
        """A process in its own session (so the whole pool can be signalled), logging to a file."""
        with (self.data_dir / f"{log_name}.log").open("w") as log_file:
            proc = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **extra_env}, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_drop_pool(self, queues: list[str], modules: tuple[str, ...] = (), *,
                        processes: int = PROCESSES, threads: int = THREADS, **extra_env: str) -> subprocess.Popen:
        """drop-worker's pool exactly as the Procfile runs it (dramatiq CLI, our middleware, relay fork)."""
        from worker.pool import dramatiq_command, metrics_env

        os.environ["DROP_WORKER_METRICS_PORT"] = "0"
        argv = dramatiq_command(["--processes", str(processes), "--threads", str(threads),
                                 *(["--queues", *queues] if queues else [])])
        argv[4:4] = modules  # extra modules go right after the broker module ("jobs")
        return self.start(argv, "drop-pool", **metrics_env(), **extra_env)

    def log_tail(self, log_name: str, chars: int = 3000) -> str:
        path = self.data_dir / f"{log_name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _reset_clients(namespace: str | None) -> None:
    from db.pool import close_pool
    from worker.redis_client import reset_redis
    from worker.settings import get_settings

    close_pool()
    reset_redis()
    get_settings.cache_clear()
    if namespace is not None and "jobs.app" in sys.modules:
        sys.modules["jobs.app"].broker.namespace = f"{namespace}-dramatiq"


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process's session, then SIGKILL whatever is left of it (the figures are taken
    by then; waiting out the pool's 30 s graceful shutdown would only lengthen the run)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def session_pids(leader: int) -> list[int]:
    """Every live process of a session (a pool's master, worker processes, relay fork)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == leader:
                found.append(p.pid)
    return found


def worker_pids(leader: int, *, exclude_leader: bool = True) -> list[int]:
    """The consuming processes of a pool: children of the master that are not the relay fork."""
    import psutil

    pids = []
    for pid in session_pids(leader):
        if exclude_leader and pid == leader:
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            cmd = " ".join(proc.cmdline())
            if "dramatiq" in cmd or "celery" in cmd:
                pids.append((proc.num_threads(), pid))
    # Forks beside the workers (the outbox relay, Prometheus' exposition server) run the same
    # command line with a few threads; worker processes have at least --threads of them.
    return [pid for threads, pid in pids if threads > THREADS]


@dataclass
class Progress:
    """(seconds since start, items done) samples; the steady rate is taken from 10 % to 90 %."""

    total: int
    samples: list[tuple[float, int]] = field(default_factory=list)

    def watch(self, done: Callable[[], int], timeout_s: float, interval: float = 0.1,
              procs: list[subprocess.Popen] | None = None) -> Progress:
        t0 = time.perf_counter()
        while True:
            n = done()
            now = time.perf_counter() - t0
            self.samples.append((now, n))
            if n >= self.total or now > timeout_s:
                return self
            if procs and any(p.poll() is not None for p in procs):
                return self  # a pool died: no point waiting for the timeout
            time.sleep(interval)

    @property
    def done(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def rate(self, lo: float = 0.1, hi: float = 0.9) -> float:
        """Items/s between the first sample ≥ lo·total and the first ≥ hi·total (boot excluded)."""
        try:
            t_lo, n_lo = next((t, n) for t, n in self.samples if n >= lo * self.total)
            t_hi, n_hi = next((t, n) for t, n in self.samples if n >= hi * self.total)
        except StopIteration:
            return float("nan")
        return (n_hi - n_lo) / (t_hi - t_lo) if t_hi > t_lo else float("nan")


@contextlib.contextmanager
def cpu_meter() -> Iterator[dict[str, float]]:
    """Machine CPU busy fraction over the block (all cores, everyone's load included)."""

    def snap() -> tuple[float, float]:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    result: dict[str, float] = {}
    b0, t0 = snap()
    try:
        yield result
    finally:
        b1, t1 = snap()
        result["busy"] = (b1 - b0) / max(t1 - t0, 1)
