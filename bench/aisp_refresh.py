"""AISP refresh throughput: one slot's fan-out for N accounts, refreshed by real Dramatiq worker
processes against the sandbox with 100 ms latency per balance request.

    python -m bench aisp [--accounts 20000] [--processes 2] [--threads 8] [--latency-ms 100]

Everything is real and on loopback: PostgreSQL and Redis (DATABASE_URL / REDIS_URL, else the
embedded ones), the sandbox (`python -m sandbox`, its own process), the worker pool
(`python -m worker.pool`, i.e. the `dramatiq` CLI with the outbox relay fork), the quota ledger.
The run uses its own PostgreSQL schema and Redis namespace and removes both at the end.

Measured: fan-out time (the `INSERT … SELECT` of the outbox rows: `aisp.refresh_batch` jobs of
up to 100 accounts due in the same second), then the refresh rate while
balances land (steady state = between 10 % and 90 % of accounts synced), the whole-run rate,
CPU use of the machine, and correctness (exactly one request per account at the sandbox, every
ledger row `ok`). Goal: ≥ 1000 accounts/s on a 2-core node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
GOAL_PER_S = 1000
CREDS = {"NEONOMICS_CLIENT_ID": "bench-client", "NEONOMICS_CLIENT_SECRET": "bench-secret"}


def _with_schema(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-c search_path={schema}')}"


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _process_cpu() -> dict[int, tuple[str, int, float]]:
    """pid → (command name, session id, user+system seconds) for every process we can read."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        found[int(entry.name)] = (name, int(fields[3]), (int(fields[11]) + int(fields[12])) / tick)
    return found


def _cpu_by_role(before: dict, after: dict, roles: dict[str, int]) -> dict[str, float]:
    """CPU seconds used between two snapshots, by role: our worker pool and sandbox sessions,
    PostgreSQL, Redis, and everything else on the machine (other users' load included)."""
    used: dict[str, float] = {}
    sessions = {sid: role for role, sid in roles.items()}
    for pid, (name, sid, secs) in after.items():
        delta = secs - (before.get(pid, (name, sid, 0.0))[2] if before.get(pid, ("",))[0] == name else 0.0)
        role = sessions.get(sid) or ("postgres" if name.startswith("postgres") else
                                     "redis" if name.startswith("redis") else
                                     "bench (this process)" if pid == os.getpid() else "other processes")
        used[role] = used.get(role, 0.0) + max(delta, 0.0)
    return {k: round(v, 1) for k, v in sorted(used.items(), key=lambda kv: -kv[1])}


def _machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPU ({model}), {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


class Sandbox:
    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", "0"],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()
        self.url = ""
        while not self.url:
            line = lines.get(timeout=30)
            if line.startswith("sandbox listening on "):
                self.url = line.split()[-1]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


def _in_process(args: argparse.Namespace, db_url: str, admin: object) -> int:
    """The read path alone: `aisp.refresh` for every account, `--threads` in flight, one loop."""
    import asyncio

    from jobs import aisp
    from worker.settings import get_settings

    os.environ.update({"DATABASE_URL": db_url, "NEONOMICS_API_URL": admin.url})  # type: ignore[attr-defined]
    get_settings.cache_clear()

    async def run_all() -> int:
        gate = asyncio.Semaphore(args.threads * args.processes)

        async def one(i: int) -> str:
            async with gate:
                return (await aisp.refresh_handled(f"ba_{i}", "scheduler")).outcome

        outcomes = await asyncio.gather(*(one(i) for i in range(1, args.accounts + 1)))
        await aisp.close_async_pool()
        return sum(1 for o in outcomes if o == "ok")

    cpu0, wall0 = time.process_time(), time.perf_counter()
    ok = asyncio.run(run_all())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(json.dumps({"mode": "in-process (one event loop, no Dramatiq)", "accounts": args.accounts, "ok": ok,
                      "in_flight": args.threads * args.processes, "elapsed_s": round(wall, 2),
                      "per_s": round(ok / wall), "process_cpu_ms_per_read": round(1000 * cpu / max(ok, 1), 3),
                      "sandbox_balance_requests": admin.count("neonomics.balances")}, indent=2))  # type: ignore
    return 0 if ok == args.accounts else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench aisp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default: 2, one per core)")
    # The fan-out's jobs are aisp.refresh_batch messages of up to 100 accounts, each read
    # concurrently on the process's event loop: a thread per batch, not per read (the Procfile's 8).
    parser.add_argument("--threads", type=int, default=8, help="worker threads per process")
    parser.add_argument("--latency-ms", type=int, default=100)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--in-process", action="store_true",
                        help="no Dramatiq: run the reads as coroutines on one event loop in this process "
                             "(isolates the cost of the read itself from the per-message job machinery)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    data_dir = Path(tempfile.mkdtemp(prefix="drop-bench-"))
    embedded = None
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        from worker.embedded import ensure_services

        embedded = ensure_services(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"), data_dir)
        os.environ["DATABASE_URL"] = embedded.database_url or ""
        os.environ["REDIS_URL"] = embedded.redis_url or ""
    base_db, redis_url = os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
    run_id = uuid.uuid4().hex[:10]
    schema, namespace = f"bench_aisp_{run_id}", f"bench{run_id}"
    db_url = _with_schema(base_db, schema)

    env = {**os.environ, **CREDS, "PYTHONPATH": str(ROOT), "DATABASE_URL": db_url, "REDIS_URL": redis_url,
           "DROP_REDIS_NAMESPACE": namespace, "DROP_DATA_DIR": str(data_dir), "DROP_ENV": "development",
           "DROP_WORKER_METRICS_PORT": "0", "DROP_LOG_LEVEL": "WARNING"}
    os.environ.update({k: env[k] for k in (*CREDS, "DATABASE_URL", "DROP_REDIS_NAMESPACE", "DROP_DATA_DIR")})

    with psycopg.connect(base_db, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sandbox = worker = None
    try:
        from db.migrate import migrate

        migrate(db_url)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("INSERT INTO users (id) VALUES ('bench-user')")
            conn.execute(
                """INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id)
                   SELECT 'ba_' || g, 'bench-user', 'acc_' || g, 'consent_' || g FROM generate_series(1, %s) g""",
                (args.accounts,),
            )
            conn.execute("ANALYZE bank_accounts")

        sandbox = Sandbox(env)
        env["NEONOMICS_API_URL"] = sandbox.url
        from sandbox.admin import SandboxAdmin

        admin = SandboxAdmin(sandbox.url)
        admin.reset(client_id=CREDS["NEONOMICS_CLIENT_ID"], client_secret=CREDS["NEONOMICS_CLIENT_SECRET"])
        admin.fault("neonomics.balances", latency_ms=args.latency_ms)

        if args.in_process:
            return _in_process(args, db_url, admin)
        worker_log = data_dir / "worker.log"
        with worker_log.open("w") as log_file:
            # The Procfile's command (worker.pool), minus its signal-forwarding wrapper, so that this
            # process's own session holds the whole pool (master, workers, relay fork).
            from worker.pool import dramatiq_command, metrics_env

            worker = subprocess.Popen(
                dramatiq_command(["--processes", str(args.processes), "--threads", str(args.threads),
                                  "--queues", "aisp"]),
                cwd=ROOT, env={**env, **metrics_env()}, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        time.sleep(4)  # processes boot (imports, event loop, relay fork) before the clock starts
        if worker.poll() is not None:
            raise RuntimeError(f"worker pool exited: {worker_log.read_text()[-2000:]}")

        from jobs import aisp, aisp_batch

        with psycopg.connect(db_url, autocommit=True) as conn:
            slot = aisp.clock().replace(microsecond=0)
            started = time.perf_counter()
            # The fan-out itself, timed in-process (the same function the actor runs).
            os.environ["DATABASE_URL"] = db_url
            enqueued = aisp_batch.fan_out(slot, spread_s=0)
            fanout_s = time.perf_counter() - started
            # Wake the relays (the trigger already notified; this is belt and braces).
            conn.execute("NOTIFY job_outbox")
            cpu0, t0, procs0 = _cpu_times(), time.perf_counter(), _process_cpu()
            samples: list[tuple[float, int]] = []
            while True:
                n = conn.execute("SELECT count(*) FROM bank_accounts WHERE balance_synced_at IS NOT NULL").fetchone()[0]
                now = time.perf_counter() - t0
                samples.append((now, n))
                if n >= args.accounts or now > args.timeout_s:
                    break
                time.sleep(0.25)
            cpu1, procs1 = _cpu_times(), _process_cpu()
            elapsed = samples[-1][0]
            synced = samples[-1][1]
            outcomes = dict(conn.execute("SELECT outcome, count(*) FROM aisp_reads GROUP BY 1").fetchall())
        requests_seen = admin.count("neonomics.balances")

        def first_at(fraction: float) -> float:
            return next(t for t, n in samples if n >= fraction * args.accounts)

        # Steady state: from 10 % to 90 % synced (or to the end of an unfinished run).
        lo = first_at(0.1) if synced >= 0.1 * args.accounts else 0.0
        n_lo = next(n for t, n in samples if t >= lo)
        hi, n_hi = (first_at(0.9), next(n for t, n in samples if n >= 0.9 * args.accounts)) \
            if synced >= 0.9 * args.accounts else (elapsed, synced)
        steady = (n_hi - n_lo) / (hi - lo) if hi > lo else float("nan")
        cpu = (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1)
        figures = {
            "machine": _machine(),
            "accounts": args.accounts, "processes": args.processes, "threads": args.threads,
            "latency_ms": args.latency_ms,
            "fanout_accounts": enqueued, "fanout_s": round(fanout_s, 3),
            "fanout_accounts_per_s": round(enqueued / fanout_s) if fanout_s else None,
            "synced": synced, "elapsed_s": round(elapsed, 2),
            "overall_per_s": round(synced / elapsed) if elapsed else None,
            "steady_per_s": round(steady),
            "machine_cpu_busy": round(cpu, 3),
            "cpu_seconds_by_role": _cpu_by_role(procs0, procs1, {"worker pool": worker.pid,
                                                                 "sandbox": sandbox.proc.pid}),
            "sandbox_balance_requests": requests_seen,
            "ledger_outcomes": outcomes,
            "goal_per_s": GOAL_PER_S,
        }
        ok = synced == args.accounts and requests_seen == args.accounts and outcomes == {"ok": args.accounts}
        print(json.dumps(figures, indent=2))
        if not ok:
            print(f"worker log (tail, {worker_log}):\n{worker_log.read_text()[-3000:]}")
        verdict = "MET" if steady >= GOAL_PER_S and ok else "MISSED"
        print(f"AISP refresh: {figures['steady_per_s']} accounts/s steady, {figures['overall_per_s']}/s overall "
              f"({args.accounts} accounts, {args.latency_ms} ms latency, {args.processes}×{args.threads} threads, "
              f"CPU {cpu:.0%}); exactly one request per account: {ok}; goal {GOAL_PER_S}/s {verdict}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return 0 if ok else 1
    finally:
        if worker is not None:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(40)
                except subprocess.TimeoutExpired:
                    pass
            # Whatever is left of the pool's session (a stuck master, a worker child) goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(5)
        if sandbox is not None:
            sandbox.stop()
        from db.pool import close_pool

        close_pool()
        with psycopg.connect(base_db, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        client = redis.Redis.from_url(redis_url)
        for pattern in (f"{namespace}:*", f"{namespace}-dramatiq:*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
