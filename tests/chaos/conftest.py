"""Chaos suite support: real worker processes, kills, outages, receivers and a PII scan.

Sizes scale with `DROP_CHAOS_SCALE` (1 for `make test`, larger for `make chaos`); tests marked
`chaos_long` run only when `DROP_CHAOS_LONG=1` (`make chaos`). Every test has a hard timeout
(SIGALRM), every process it starts is killed (process group) when it ends, and figures are
printed and appended to `DROP_CHAOS_FIGURES` (a JSON-lines file) when set.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.conftest import BASE_REDIS_URL
from tests.monitoring.conftest import Receiver, _start_receiver

ROOT = Path(__file__).resolve().parents[2]
SCALE = max(1.0, float(os.environ.get("DROP_CHAOS_SCALE", "1")))
LONG = os.environ.get("DROP_CHAOS_LONG") == "1"
TEST_TIMEOUT_S = int(os.environ.get("DROP_CHAOS_TEST_TIMEOUT_S", str(int(240 * SCALE))))


def scaled(n: int) -> int:
    return int(n * SCALE)


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos_long: heavy chaos scenario, only with DROP_CHAOS_LONG=1 (make chaos)")


def pytest_collection_modifyitems(config, items):
    if LONG:
        return
    skip = pytest.mark.skip(reason="chaos_long: run with `make chaos` (DROP_CHAOS_LONG=1)")
    for item in items:
        if "chaos_long" in item.keywords:
            item.add_marker(skip)


class HardTimeout(Exception):
    pass


@pytest.fixture(autouse=True)
def hard_timeout(request):
    """No chaos test may hang the suite: SIGALRM after TEST_TIMEOUT_S fails it (and dumps stacks)."""
    limit = TEST_TIMEOUT_S

    def expire(signum, frame):
        faulthandler.dump_traceback(all_threads=True)
        raise HardTimeout(f"{request.node.name} exceeded its hard timeout of {limit} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def figure(scenario: str, **values) -> None:
    """Print a measured figure and append it to DROP_CHAOS_FIGURES (for docs/reliability.md)."""
    record = {"scenario": scenario, "scale": SCALE, **values}
    print(f"\nCHAOS FIGURE {json.dumps(record)}")
    path = os.environ.get("DROP_CHAOS_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lose_redis(namespace: str, url: str = BASE_REDIS_URL) -> int:
    """What FLUSHALL does, limited to one test's namespace (the shared server stays up)."""
    client = redis.Redis.from_url(url)
    deleted = 0
    for pattern in (f"{namespace}:*", f"{namespace}-dramatiq:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            deleted += client.delete(*keys[i : i + 500])
    client.close()
    return deleted


# --- processes ----------------------------------------------------------------------------


@dataclass
class Processes:
    """Starts real `dramatiq`/pool/monitor processes for one test; kills their groups at the end."""

    logdir: Path
    base_env: dict[str, str]
    started: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        port = free_port()
        prom = self.logdir / f"prom-{port}"
        prom.mkdir(parents=True, exist_ok=True)
        return {**os.environ, **self.base_env, "dramatiq_prom_port": str(port), "dramatiq_prom_db": str(prom),
                "DROP_WORKER_METRICS_PORT": str(port), "PYTHONPATH": str(ROOT), **extra}

    def spawn(self, args: list[str], name: str, **extra_env: str) -> subprocess.Popen:
        log = self.logdir / f"{name}-{len(self.started)}.log"
        self.logs.append(log)
        proc = subprocess.Popen(args, cwd=ROOT, env=self.env(**extra_env), start_new_session=True,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        self.started.append(proc)
        return proc

    def worker(self, processes: int = 1, threads: int = 4, **extra_env: str) -> subprocess.Popen:
        """`dramatiq jobs.app` (+ its outbox relay fork), as the Procfile runs it."""
        return self.spawn([sys.executable, "-m", "dramatiq", "jobs.app", "--processes", str(processes),
                           "--threads", str(threads)], "worker", **extra_env)

    def pool(self, processes: int = 1, threads: int = 4, **extra_env: str) -> subprocess.Popen:
        """`python -m worker.pool` (the Procfile worker: forwards one SIGTERM)."""
        return self.spawn([sys.executable, "-m", "worker.pool", "--processes", str(processes),
                           "--threads", str(threads)], "pool", **extra_env)

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 40) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def stop_all(self) -> None:
        import psutil

        for proc in self.started:
            # The pool's Dramatiq runs in a session of its own (worker.pool): its tree, not only
            # the wrapper's process group, or a pool outlives the test (seen after `make test`).
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture
def procs(db, redis_namespace, tmp_path) -> Iterator[Processes]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    p = Processes(logdir, {"DATABASE_URL": db, "DROP_REDIS_NAMESPACE": redis_namespace,
                           "DROP_DATA_DIR": str(tmp_path), "DROP_LOG_LEVEL": "INFO"})
    try:
        yield p
    finally:
        p.stop_all()


# --- Slack / Sentry receivers and the PII scan ---------------------------------------------


@dataclass
class Seeds:
    """Distinctive personal data for one run: none of it may leave the database."""

    pid: str
    first_name: str
    last_name: str
    iban: str
    email: str

    @property
    def pid_hash(self) -> str:
        return hashlib.sha256(self.pid.encode()).hexdigest()

    def values(self) -> list[str]:
        return [self.pid, self.first_name, self.last_name, self.iban, self.email]


def new_seeds() -> Seeds:
    tag = secrets.token_hex(4)
    digits = "".join(str(b % 10) for b in secrets.token_bytes(9))
    return Seeds(pid=f"29{digits}", first_name=f"Zyxkarina{tag}", last_name=f"Qwnordmann{tag}",
                 iban=f"NO93{digits[:7]}{tag.upper()}", email=f"chaos.{tag}@drop-pii.invalid")


@dataclass
class Capture:
    """Everything that left the processes: Slack, Sentry, logs (test process and workers)."""

    slack: Receiver
    sentry: Receiver
    seeds: Seeds
    bodies: list[str] = field(default_factory=list)  # raw webhook bodies sent (must not leak)
    procs: Processes | None = None

    def outputs(self, caplog_text: str = "") -> dict[str, str]:
        out = {
            "slack": "\n".join(r.body.decode(errors="replace") for r in self.slack.requests),
            "sentry": "\n".join(r.body.decode(errors="replace") for r in self.sentry.requests),
            "test-process log": caplog_text,
        }
        if self.procs is not None:
            out["worker logs"] = self.procs.log_text()
        return out

    def leaks(self, caplog_text: str = "") -> list[str]:
        found = []
        needles = [*self.seeds.values(), *(b for b in self.bodies if len(b) >= 40)]
        for where, text in self.outputs(caplog_text).items():
            for needle in needles:
                if needle and needle in text:
                    found.append(f"{where}: {needle[:60]!r}")
        return found


@pytest.fixture
def capture(monkeypatch, redis_namespace, caplog, request) -> Iterator[Capture]:
    """SLACK_WEBHOOK_URL and SENTRY_DSN → local receivers, for this process and the workers it
    starts; after the test, no seeded PII or webhook body may appear in any captured output."""
    import logging

    from worker.settings import get_settings
    from worker.slack import reset_notifier

    slack, sentry = Receiver(), Receiver()
    slack.server, sentry.server = _start_receiver(slack), _start_receiver(sentry)
    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"{slack.url}/services/T000/B000/chaos-token")
    monkeypatch.setenv("DROP_SLACK_MIN_INTERVAL_S", "0.05")
    host, port = sentry.server.server_address[:2]
    monkeypatch.setenv("SENTRY_DSN", f"http://public@{host}:{port}/1")
    get_settings.cache_clear()
    reset_notifier()
    caplog.set_level(logging.INFO)
    cap = Capture(slack, sentry, new_seeds())
    if "procs" in request.fixturenames:
        cap.procs = request.getfixturevalue("procs")
    try:
        yield cap
        leaks = cap.leaks(caplog.text)
        assert not leaks, f"personal data or webhook bodies leaked: {leaks[:10]}"
        figure("privacy", test=request.node.name, slack_messages=len(slack.requests),
               sentry_envelopes=len(sentry.requests), log_bytes=len("".join(cap.outputs(caplog.text).values())),
               seeded_values=len(cap.seeds.values()), bodies=len(cap.bodies), leaks=0)
    finally:
        reset_notifier()
        for r in (slack, sentry):
            r.server.shutdown()
            r.server.server_close()


# --- private servers (never restart the shared ones) ----------------------------------------


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free loopback port that a test may stop and start.

    Uses the binaries bundled with `pgserver` (the `embedded` extra); as root it runs the server
    as pgserver's unprivileged `pgserver` user, like pgserver itself does.
    """

    def __init__(self, listen: str = "127.0.0.1", server_options: str = "", trust_network: str = "") -> None:
        """`trust_network`: a CIDR whose clients are trusted too (the cluster suite's bridge)."""
        from pgserver._commands import initdb

        self.listen, self.server_options = listen, server_options
        self.user = None
        self.dir = Path(tempfile.mkdtemp(prefix="drop-chaos-pg-"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.data.mkdir()
        if os.geteuid() == 0:
            import shutil

            from pgserver.utils import ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
            shutil.chown(self.dir, self.user)
            shutil.chown(self.data, self.user)
        self.port = free_port()
        initdb(["--auth=trust", "--auth-local=trust", "-U", "postgres", "-E", "UTF8"], pgdata=self.data,
               user=self.user, timeout=120)
        if trust_network:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {trust_network} trust\n")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-t", "60", "-o", f"-h {self.listen} -p {self.port} -k {self.dir} {self.server_options}",
                "-l", str(self.dir / "log"), "start"], pgdata=self.data, user=self.user, timeout=90)

    def stop(self, mode: str = "immediate") -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-t", "60", "-m", mode, "stop"], pgdata=self.data, user=self.user, timeout=90)

    def destroy(self) -> None:
        import shutil

        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server without persistence on a free port (for a real restart in `make chaos`)."""

    def __init__(self, binary: str = "redis-server", extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="drop-chaos-redis-"))
        self.binary = binary
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class PrivateSentinel:
    """A redis-sentinel (Debian's `redis-sentinel`, else `redis-server --sentinel`) watching
    `primary` as service `name`, quorum 1, declaring it down after `down_after_ms`."""

    def __init__(self, primary: PrivateRedis, name: str = "drop", down_after_ms: int = 2000) -> None:
        import shutil

        self.port = free_port()
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="drop-chaos-sentinel-"))
        conf = self.dir / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
                        f"sentinel monitor {name} 127.0.0.1 {primary.port} 1\n"
                        f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                        f"sentinel failover-timeout {name} 10000\nsentinel parallel-syncs {name} 1\n")
        binary = shutil.which("redis-sentinel")
        args = [binary, str(conf)] if binary else ["redis-server", str(conf), "--sentinel"]
        self.proc = subprocess.Popen(args, stdout=open(self.dir / "log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if client.sentinel_get_master_addr_by_name(name):
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis-sentinel did not start")

    def primary_port(self) -> int | None:
        try:
            addr = redis.Redis(port=self.port, socket_timeout=1).sentinel_get_master_addr_by_name(self.name)
        except redis.exceptions.RedisError:
            return None
        return int(addr[1]) if addr else None

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}/{db}"

    def kill(self) -> None:
        import shutil

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"
