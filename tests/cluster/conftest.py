"""The cluster suite (`make cluster`): three "hosts", each a network namespace with its own
address, and a "core" namespace holding PostgreSQL, Redis and the provider sandbox, joined by a
bridge the suite creates and removes. Every address lives inside a namespace the suite created;
nothing is configured in the machine's own namespace.

    core  10.a.b.1   PostgreSQL, Redis (password), sandbox (loopback, forwarded to the bridge)
    h1    10.a.b.11  worker pool (+ relay), scheduler
    h2    10.a.b.12  worker pool (+ relay), scheduler
    h3    10.a.b.13  worker pool (+ relay), monitor

The test process reaches the core's servers from a thread that entered the core namespace
(`Netns.run`), and cuts a host off by setting its link down on the bridge side.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.rows import dict_row

from tests.chaos.conftest import PrivatePostgres, figure, new_seeds  # noqa: F401 (figure: re-exported)

ROOT = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
SANDBOX_ENV = {
    "NEONOMICS_CLIENT_ID": "cluster-client", "NEONOMICS_CLIENT_SECRET": "cluster-secret",
    "SUMSUB_APP_TOKEN": "cluster-app-token", "SUMSUB_SECRET_KEY": "cluster-sumsub-secret",
    "SUMSUB_WEBHOOK_SECRET": "cluster-webhook-secret",
}
_libc = ctypes.CDLL(None, use_errno=True)


def netns_unavailable() -> str | None:
    """Why this machine cannot run the suite, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces and veth pairs needs root"
    for binary in ("ip", "redis-server"):
        if shutil.which(binary) is None:
            return f"`{binary}` is not installed"
    probe = f"drop-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if "tests/cluster/" in str(item.fspath)]
    if not ours:
        return
    # ~12 minutes of three hosts' processes on two cores: `make cluster` runs it, `make test` not.
    reason = "run with `make cluster` (DROP_CLUSTER=1)" if os.environ.get("DROP_CLUSTER") != "1" \
        else netns_unavailable()
    if reason:
        skip = pytest.mark.skip(reason=f"cluster suite skipped: {reason}")
        for item in ours:
            item.add_marker(skip)


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _enter(name: str) -> None:
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


class Netns:
    """A network namespace; `run` calls a function on a thread inside it (sockets it opens, and
    processes it starts, belong to the namespace)."""

    def __init__(self, name: str) -> None:
        self.name = name
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        self._thread = ThreadPoolExecutor(1, initializer=_enter, initargs=(name,), thread_name_prefix=name)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._thread.submit(fn, *args, **kwargs).result()

    def argv(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def kill_all(self) -> None:
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def delete(self) -> None:
        self.kill_all()
        self._thread.shutdown(wait=False, cancel_futures=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@dataclass
class Host:
    name: str
    ns: Netns
    addr: str
    link: str  # the veth end on the core's bridge
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def log_text(self, kind: str) -> str:
        return self.logs[kind].read_text(errors="replace") if kind in self.logs else ""


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = secrets.token_hex(3)
        net = f"10.{random.randint(100, 250)}.{random.randint(1, 250)}"
        self.core_addr = f"{net}.1"
        self.namespaces: list[Netns] = []
        self.services: list[subprocess.Popen] = []
        self.pg: PrivatePostgres | None = None
        self.hosts: list[Host] = []
        self.redis_password = secrets.token_hex(12)
        self.core = self._ns("core")
        ip("-n", self.core.name, "link", "add", "br0", "type", "bridge")
        ip("-n", self.core.name, "addr", "add", f"{self.core_addr}/24", "dev", "br0")
        ip("-n", self.core.name, "link", "set", "br0", "up")
        for i in (1, 2, 3):
            ns = self._ns(f"h{i}")
            link = f"vh{i}"
            ip("link", "add", link, "netns", self.core.name, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
            ip("-n", self.core.name, "link", "set", link, "master", "br0")
            ip("-n", self.core.name, "link", "set", link, "up")
            ip("-n", ns.name, "addr", "add", f"{net}.1{i}/24", "dev", "eth0")
            ip("-n", ns.name, "link", "set", "eth0", "up")
            self.hosts.append(Host(f"h{i}", ns, f"{net}.1{i}", link))

    def _ns(self, role: str) -> Netns:
        ns = Netns(f"drop-{role}-{self.tag}")
        self.namespaces.append(ns)
        return ns

    # --- the core's servers -----------------------------------------------------------------

    def start_servers(self) -> None:
        from db.migrate import migrate

        self.pg = self.core.run(PrivatePostgres, listen=f"127.0.0.1,{self.core_addr}",
                                server_options="-c max_connections=300", trust_network=f"{self.core_addr}/24")
        self.core.run(migrate, self.pg.url)
        self.redis_port, self.sandbox_port = 6379, 8080
        self._service(["redis-server", "--bind", "127.0.0.1", self.core_addr, "--port", str(self.redis_port),
                       "--requirepass", self.redis_password, "--save", "", "--appendonly", "no"], "redis")
        env = {**os.environ, **SANDBOX_ENV, "PYTHONPATH": str(ROOT), "DROP_DATA_DIR": str(self.tmp / "sandbox"),
               "DROP_SANDBOX_ADMIN_TOKEN": self.sandbox_token}
        self._service([sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", str(self.sandbox_port)],
                      "sandbox", env)
        self._service([sys.executable, "-m", "tests.cluster.forward", self.core_addr, str(self.sandbox_port),
                       "127.0.0.1", str(self.sandbox_port)], "forward", {**os.environ, "PYTHONPATH": str(ROOT)})
        self.core.run(self._wait_servers)

    @property
    def sandbox_token(self) -> str:
        return f"cluster-admin-{self.tag}"

    def _service(self, args: list[str], name: str, env: dict[str, str] | None = None) -> None:
        log = self.tmp / f"core-{name}.log"
        self.services.append(subprocess.Popen(self.core.argv(args), cwd=ROOT, env=env, start_new_session=True,
                                              stdout=open(log, "ab"), stderr=subprocess.STDOUT))

    def _wait_servers(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.redis().ping()
                urllib.request.urlopen(f"http://{self.core_addr}:{self.sandbox_port}/_admin/health", timeout=1)
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("the core's Redis or sandbox did not start")

    def redis(self) -> redis.Redis:
        """A client for the core's Redis (call inside `core.run`)."""
        return redis.Redis(host="127.0.0.1", port=self.redis_port, password=self.redis_password, socket_timeout=5)

    def sql_here(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        """A statement on the core's PostgreSQL, from a thread already inside the core."""
        assert self.pg is not None
        with psycopg.connect(self.pg.url, autocommit=True, row_factory=dict_row) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def sql(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        return self.core.run(self.sql_here, query, params)

    # --- the hosts' processes ---------------------------------------------------------------

    def host_env(self, host: Host, **extra: str) -> dict[str, str]:
        assert self.pg is not None
        data = self.tmp / host.name
        data.mkdir(exist_ok=True)
        return {
            **os.environ, **SANDBOX_ENV, "PYTHONPATH": str(ROOT), "DROP_DATA_DIR": str(data),
            "DATABASE_URL": f"postgresql://postgres@{self.core_addr}:{self.pg.port}/postgres",
            "REDIS_URL": f"redis://:{self.redis_password}@{self.core_addr}:{self.redis_port}/0",
            "NEONOMICS_API_URL": f"http://{self.core_addr}:{self.sandbox_port}",
            "SUMSUB_API_URL": f"http://{self.core_addr}:{self.sandbox_port}",
            "SLACK_WEBHOOK_URL": "", "SENTRY_DSN": "", "DROP_LOG_LEVEL": "INFO",
            "DROP_WORKER_METRICS_PORT": "9191", "DROP_SCHEDULER_METRICS_PORT": "0", **extra,
        }

    def start(self, host: Host, kind: str) -> subprocess.Popen:
        args = {"worker": [sys.executable, "-m", "worker.pool", "--processes", "1", "--threads", "8"],
                "scheduler": [sys.executable, "scheduler.py"],
                "monitor": [sys.executable, "-m", "monitoring"]}[kind]
        log = self.tmp / f"{host.name}-{kind}.log"
        proc = subprocess.Popen(host.ns.argv(args), cwd=ROOT, env=self.host_env(host), start_new_session=True,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        host.procs[kind], host.logs[kind] = proc, log
        return proc

    def cut(self, host: Host) -> None:
        ip("-n", self.core.name, "link", "set", host.link, "down")

    def rejoin(self, host: Host) -> None:
        ip("-n", self.core.name, "link", "set", host.link, "up")

    def kill_host(self, host: Host) -> None:
        """Every process of the host at once: SIGKILL to each pid in its namespace (the worker
        pool's Dramatiq runs in a session of its own, so a process group is not the host)."""
        host.ns.kill_all()
        for proc in host.procs.values():
            proc.wait(10)

    def health(self) -> dict[str, Any]:
        """The monitor's /v1/health, asked from its own host (it binds loopback there)."""
        def ask() -> dict[str, Any]:
            try:
                with urllib.request.urlopen("http://127.0.0.1:9300/v1/health", timeout=3) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as error:
                return json.loads(error.read())
            except OSError:
                return {}

        return self.hosts[2].ns.run(ask)

    def destroy(self) -> None:
        for host in self.hosts:
            for proc in host.procs.values():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self.services:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.pg is not None:
            self.pg.destroy()
        for ns in self.namespaces:
            ns.delete()


@pytest.fixture
def cluster(tmp_path, monkeypatch) -> Iterator[Cluster]:
    from worker.breaker import reset_breakers
    from worker.providers import reset_clients
    from worker.redis_client import reset_redis
    from worker.settings import get_settings

    c = Cluster(tmp_path)
    try:
        c.start_servers()
        assert c.pg is not None
        # The test process's own calls (the workload's enqueues and payment initiations) run
        # on the core's thread, against the core's loopback addresses.
        for name, value in {**SANDBOX_ENV, "DATABASE_URL": c.pg.url,
                            "REDIS_URL": f"redis://:{c.redis_password}@127.0.0.1:{c.redis_port}/0",
                            "NEONOMICS_API_URL": f"http://127.0.0.1:{c.sandbox_port}",
                            "SUMSUB_API_URL": f"http://127.0.0.1:{c.sandbox_port}",
                            "DROP_SANDBOX_ADMIN_TOKEN": c.sandbox_token}.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        reset_clients()
        reset_breakers()
        reset_redis()
        yield c
    finally:
        c.destroy()
        get_settings.cache_clear()
        reset_clients()
        reset_redis()
        leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert c.tag not in leftovers, "the suite left a network namespace behind"
