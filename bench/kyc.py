"""KYC webhook throughput against the limit and the peer, latency, soak and profile (points 1–4, 7, 8).

    python -m bench kyc [--jobs 10000] [--noop-jobs 40000] [--quick]

Each run: a private schema/namespace, the workload written before the workers start (so their
boot is not timed), then the worker processes are started and the rate is taken between 10 %
and 90 % of the work done. All pools have the Procfile's shape (2 processes × 8 threads).

- limit: Dramatiq no-op actor on a plain RedisBroker (Dramatiq's default middleware).
- drop no-op: the same no-op through drop-worker's broker and middleware (what our stack costs).
- KYC (drop-worker): signed Sumsub webhooks, relayed messages (with their outbox id) preloaded in
  Redis; each job = digest, parse, one transaction (dedup row, user update, screening result,
  notification, audit, outbox row done).
- KYC (Celery): the same messages' payloads, the same `jobs.kyc.process_webhook`, Celery 5 with a
  Redis broker, `acks_late`, 2 worker processes × 8 threads.
- KYC through the outbox: rows only in PostgreSQL; the relay fork moves them (the production path).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from bench.harness import PROCESSES, THREADS, WEBHOOK_SECRET, Progress, Sandboxed, cpu_meter, worker_pids

ALG = "HMAC_SHA256_HEX"
# Event mix: 70 % approved, 20 % "retry" (RED + RETRY), 10 % pending (audit only). No final RED:
# that enqueues the AML check, which calls Sumsub (a different benchmark).
MIX = ["GREEN"] * 7 + ["RETRY"] * 2 + ["PENDING"]


# --- workload -------------------------------------------------------------------------------


def seed_users(sb: Sandboxed, n: int) -> None:
    sb.sql("""INSERT INTO users (id, kyc_applicant_id, kyc_status)
              SELECT 'u' || g, 'app' || g, 'pending' FROM generate_series(1, %s) g""", (n,))
    sb.sql("ANALYZE users")


def webhook_payload(i: int, users: int, base_ms: int) -> dict[str, Any]:
    """A signed Sumsub webhook as the web tier forwards it (raw body text + digest headers)."""
    from worker.providers.sumsub import webhook_digest

    applicant = f"app{i % users + 1}"
    kind = MIX[i % len(MIX)]
    event: dict[str, Any] = {"applicantId": applicant, "inspectionId": f"insp{i}", "correlationId": f"req-{i}",
                             "levelName": "basic-kyc-level", "externalUserId": f"u{i % users + 1}",
                             "sandboxMode": False, "createdAtMs": str(base_ms + i)}
    if kind == "PENDING":
        event.update(type="applicantPending", reviewStatus="pending")
    else:
        event.update(type="applicantReviewed", reviewStatus="completed",
                     reviewResult={"reviewAnswer": "GREEN"} if kind == "GREEN" else
                     {"reviewAnswer": "RED", "reviewRejectType": "RETRY", "rejectLabels": ["DOCUMENT_PAGE_MISSING"]})
    body = json.dumps(event)
    digest = webhook_digest(WEBHOOK_SECRET.encode(), body.encode(), ALG)
    return {"body": body, "headers": {"X-Payload-Digest": digest, "X-Payload-Digest-Alg": ALG},
            "received_at": datetime.now(UTC).isoformat()}


INSERTED_AT = [0.0]


def insert_outbox(sb: Sandboxed, first: int, n: int, users: int, *, relayed: bool,
                  returning: bool = True) -> list[dict]:
    """n webhook rows in job_outbox (one statement); relayed=True keeps the relay's hands off them."""
    base_ms = int(time.time() * 1000) - 3_600_000
    payloads = [Jsonb(webhook_payload(i, users, base_ms)) for i in range(first, first + n)]
    keys = [f"bench:{sb.namespace}:{i}" for i in range(first, first + n)]
    with psycopg.connect(sb.db_url, autocommit=True) as conn:
        from psycopg.rows import dict_row

        INSERTED_AT[0] = time.perf_counter()  # the burst's clock starts at the INSERT, payloads signed
        cur = conn.cursor(row_factory=dict_row).execute(
            """INSERT INTO job_outbox (job, payload, idempotency_key, relayed_at)
               SELECT 'kyc.sumsub_webhook', p, k, CASE WHEN %s THEN now() END
                 FROM unnest(%s::jsonb[], %s::text[]) AS t(p, k)"""
            # payload_text: the relay decodes rows from text (worker.relay._message_for)
            + (" RETURNING id, job, payload, payload::text AS payload_text, idempotency_key" if returning else ""),
            (relayed, payloads, keys),
        )
        rows = cur.fetchall() if returning else []
    return rows


def preload_drop(rows: list[dict]) -> None:
    """What the relay sends for these rows (same message shape), written to Redis up front."""
    import jobs.app
    from worker.dramatiq_redis import enqueue_many
    from worker.relay import _message_for

    for i in range(0, len(rows), 2000):
        enqueue_many(jobs.app.broker, [_message_for(jobs.app.broker, r)[0] for r in rows[i:i + 2000]])


def preload_celery(rows: list[dict]) -> None:
    from bench.celery_app import app

    with app.producer_or_acquire() as producer:
        for r in rows:
            app.send_task("kyc.sumsub_webhook", kwargs={**r["payload"], "outbox_id": r["id"]}, producer=producer)


def outbox_done(sb: Sandboxed) -> int:
    return sb.sql("SELECT count(*) FROM job_outbox WHERE done_at IS NOT NULL")[0][0]


def _wait_boot(proc: subprocess.Popen, sb: Sandboxed, log: str, seconds: float = 1.0) -> None:
    time.sleep(seconds)
    if proc.poll() is not None:
        raise RuntimeError(f"{log} exited early:\n{sb.log_tail(log)}")


def _finish(name: str, progress: Progress, cpu: dict[str, float], **extra: Any) -> dict[str, Any]:
    elapsed = progress.samples[-1][0] if progress.samples else float("nan")
    figures = {"name": name, "jobs": progress.total, "done": progress.done, "per_s": round(progress.rate(), 1),
               "elapsed_s": round(elapsed, 2), "machine_cpu_busy": round(cpu.get("busy", float("nan")), 3), **extra}
    print(f"  {name}: {figures['per_s']} jobs/s ({progress.done}/{progress.total} in {elapsed:.1f} s, "
          f"CPU {figures['machine_cpu_busy']:.0%})", flush=True)
    return figures


def _check_complete(progress: Progress, sb: Sandboxed, log: str) -> None:
    if progress.done < progress.total:
        print(f"  INCOMPLETE ({progress.done}/{progress.total}); log tail:\n{sb.log_tail(log)}", file=sys.stderr)


# --- the runs -------------------------------------------------------------------------------


def run_noop_raw(n: int, timeout_s: float = 240) -> dict[str, Any]:
    """Point 1: the limit (Dramatiq alone, default middleware, no-op)."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    from worker.dramatiq_redis import enqueue_many

    with Sandboxed("noop") as sb:
        raw = RedisBroker(url=sb.redis_url, namespace=f"{sb.namespace}-raw")
        msgs = [dramatiq.Message(queue_name="bench", actor_name="bench.noop", args=(i,), kwargs={}, options={})
                for i in range(n)]
        for i in range(0, n, 5000):
            enqueue_many(raw, msgs[i:i + 5000])
        client = redis.Redis.from_url(sb.redis_url)
        key = f"{sb.namespace}-raw:bench.msgs"
        proc = sb.start([sys.executable, "-m", "dramatiq", "bench.noop_raw", "--processes", str(PROCESSES),
                         "--threads", str(THREADS)], "noop-raw")
        with cpu_meter() as cpu:
            progress = Progress(n).watch(lambda: n - client.hlen(key), timeout_s, interval=0.05, procs=sb.procs)
        _check_complete(progress, sb, "noop-raw")
        client.close()
        raw.close()
        del proc
        return _finish("limit: Dramatiq no-op (default middleware)", progress, cpu)


def run_noop_drop(n: int, timeout_s: float = 240) -> dict[str, Any]:
    """The same no-op through drop-worker's middleware stack: what the stack costs per message."""
    import dramatiq

    import jobs.app
    from worker.dramatiq_redis import enqueue_many

    with Sandboxed("dnoop") as sb:
        msgs = [dramatiq.Message(queue_name="bench", actor_name="bench.drop_noop", args=(i,), kwargs={}, options={})
                for i in range(n)]
        for i in range(0, n, 5000):
            enqueue_many(jobs.app.broker, msgs[i:i + 5000])
        client = redis.Redis.from_url(sb.redis_url)
        key = f"{sb.namespace}-dramatiq:bench.msgs"
        sb.start_drop_pool(["bench"], ("bench.drop_actors",))
        with cpu_meter() as cpu:
            progress = Progress(n).watch(lambda: n - client.hlen(key), timeout_s, interval=0.05, procs=sb.procs)
        _check_complete(progress, sb, "drop-pool")
        client.close()
        return _finish("drop-worker stack, no-op", progress, cpu)


def run_kyc_drop(n: int, timeout_s: float = 300, *, profile_s: float = 0, before: bool = False) -> dict[str, Any]:
    """Point 2: N signed webhooks, preloaded as relayed messages, run by drop-worker's pool.
    `before=True` loads bench.crashguard_before: the middleware as it was before the point-8 change."""
    with Sandboxed("kyc") as sb:
        seed_users(sb, n)
        rows = insert_outbox(sb, 0, n, n, relayed=True)
        preload_drop(rows)
        procs0 = _process_cpu()
        pool = sb.start_drop_pool(["kyc"], ("bench.crashguard_before",) if before else ())
        profile: dict[str, Any] = {}
        if profile_s:
            # Attach once the workers are busy; one worker process is representative.
            threading.Thread(target=_profile, args=(pool.pid, profile_s, profile), daemon=True).start()
        with cpu_meter() as cpu:
            progress = Progress(n).watch(lambda: outbox_done(sb), timeout_s, procs=sb.procs)
        cpu_ms = _cpu_ms_per_job(procs0, {"workers": pool.pid}, progress.done)
        _check_complete(progress, sb, "drop-pool")
        outcomes = dict(sb.sql("SELECT action, count(*) FROM audit_log GROUP BY 1"))
        name = ("KYC webhooks, drop-worker, before the point-8 change" if before
                else "KYC webhooks, drop-worker (Dramatiq)")
        figures = _finish(name, progress, cpu, audit=outcomes, cpu_ms_per_job=cpu_ms)
        if profile_s:
            deadline = time.monotonic() + profile_s + 20
            while "top" not in profile and "error" not in profile and time.monotonic() < deadline:
                time.sleep(0.2)
            figures["profile"] = profile
        return figures


def run_kyc_celery(n: int, timeout_s: float = 300) -> dict[str, Any]:
    """Point 3: the same handler under Celery (Redis broker, acks_late), same concurrency."""
    with Sandboxed("celery") as sb:
        seed_users(sb, n)
        rows = insert_outbox(sb, 0, n, n, relayed=True)
        os.environ["BENCH_NAMESPACE"] = sb.namespace
        sys.modules.pop("bench.celery_app", None)  # the key prefix is read at import
        preload_celery(rows)
        procs0 = _process_cpu()
        for p in range(PROCESSES):
            sb.start([sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool", "threads",
                      "--concurrency", str(THREADS), "-Q", "kyc", "-n", f"bench{p}@%h", "--loglevel", "WARNING",
                      "--without-gossip", "--without-mingle", "--without-heartbeat"], f"celery{p}")
        with cpu_meter() as cpu:
            progress = Progress(n).watch(lambda: outbox_done(sb), timeout_s, procs=sb.procs)
        cpu_ms = _cpu_ms_per_job(procs0, {f"workers{i}": p.pid for i, p in enumerate(sb.procs)}, progress.done)
        _check_complete(progress, sb, "celery0")
        outcomes = dict(sb.sql("SELECT action, count(*) FROM audit_log GROUP BY 1"))
        return _finish("KYC webhooks, Celery (same handler)", progress, cpu, audit=outcomes, cpu_ms_per_job=cpu_ms)


def run_kyc_outbox(n: int, timeout_s: float = 300) -> dict[str, Any]:
    """The production path end to end: rows in PostgreSQL only, the relay fork sends them."""
    with Sandboxed("kycob") as sb:
        seed_users(sb, n)
        pool = sb.start_drop_pool(["kyc"])
        _wait_boot(pool, sb, "drop-pool", 4)  # the relay must be up: here its work is timed
        insert_outbox(sb, 0, n, n, relayed=False)
        sb.sql("NOTIFY job_outbox")
        with cpu_meter() as cpu:
            progress = Progress(n).watch(lambda: outbox_done(sb), timeout_s, procs=sb.procs)
        _check_complete(progress, sb, "drop-pool")
        return _finish("KYC webhooks through the outbox relay", progress, cpu)


class SentryReceiver:
    """A local Sentry endpoint: accepts envelopes (200) and counts them, like sentry.io would."""

    def __init__(self) -> None:
        import http.server

        receiver = self
        self.envelopes = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.envelopes += 1
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.dsn = f"http://public@127.0.0.1:{self.server.server_address[1]}/1"

    def stop(self) -> None:
        self.server.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The deployed configuration's settings (beside the Procfile's processes); DROP_ENV stays
# development because production refuses loopback servers.
DEPLOYED_ENV = {"DROP_LOG_LEVEL": "INFO", "DROP_SENTRY_TRACES_RATE": "0.1"}
DEPLOYED = ("the Procfile's processes (worker pool 2 × 8 with its relay fork and Prometheus metrics, scheduler.py, "
            "python -m monitoring), DROP_LOG_LEVEL=INFO, Sentry on at 10 % traces (high-volume families at a "
            "tenth of that) to a local receiver, rows inserted into job_outbox")


@dataclass
class Deployed:
    """The Procfile's processes running in one sandbox, and how to attribute their CPU."""

    pool: subprocess.Popen
    roles: dict[str, int]
    receiver: SentryReceiver | None

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()


def start_deployed(sb: Sandboxed, *, sentry: bool = True, modules: tuple[str, ...] = (),
                   boot_s: float = 5) -> Deployed:
    """Worker pool (relay fork, metrics), scheduler and monitor as the Procfile starts them, with
    the deployed settings; returns once the relay is up (its work is timed)."""
    receiver = SentryReceiver() if sentry else None
    env = {**DEPLOYED_ENV, "DROP_MONITOR_PORT": str(_free_port()), "DROP_SCHEDULER_METRICS_PORT": str(_free_port())}
    if receiver is not None:
        env["SENTRY_DSN"] = receiver.dsn
    pool = sb.start_drop_pool([], modules, DROP_WORKER_METRICS_PORT=str(_free_port()), **env)
    scheduler = sb.start([sys.executable, "scheduler.py"], "scheduler", **env)
    monitor = sb.start([sys.executable, "-m", "monitoring"], "monitor", **env)
    _wait_boot(pool, sb, "drop-pool", boot_s)
    return Deployed(pool, {"workers": pool.pid, "scheduler": scheduler.pid, "monitor": monitor.pid}, receiver)


def webhooks_done(sb: Sandboxed) -> int:
    return sb.sql("SELECT count(*) FROM job_outbox WHERE job = 'kyc.sumsub_webhook' AND done_at IS NOT NULL")[0][0]


def run_kyc_deployed(n: int, timeout_s: float = 300, *, sentry: bool = True, chunks: bool = True) -> dict[str, Any]:
    """The deployed configuration: a burst of `n` webhooks inserted into job_outbox (insert → last
    effect committed), the Procfile's processes (worker pool with its relay fork, scheduler,
    monitor), INFO logging, metrics on, Sentry at the production trace rate (10 %) pointed at a
    local receiver. `chunks=False` keeps the relay from chunking (today's one message per row)."""
    with Sandboxed("kycdep") as sb:
        seed_users(sb, n)
        procs0 = _process_cpu()
        dep = start_deployed(sb, sentry=sentry, modules=() if chunks else ("bench.no_chunks",))
        insert_outbox(sb, 0, n, n, relayed=False, returning=False)
        with cpu_meter() as cpu:
            progress = Progress(n).watch(lambda: webhooks_done(sb), timeout_s, interval=0.05, procs=sb.procs)
        total_s = time.perf_counter() - INSERTED_AT[0]
        cpu_ms = _cpu_ms_per_job(procs0, dep.roles, progress.done)
        _check_complete(progress, sb, "drop-pool")
        dep.stop()
        return _finish(f"KYC burst of {n:,}, deployed ({'Sentry 10 %' if sentry else 'no Sentry'}"
                       f"{'' if chunks else ', no chunks'})", progress, cpu,
                       burst_per_s=round(progress.done / total_s, 1), burst_s=round(total_s, 2), cpu_ms_per_job=cpu_ms,
                       sentry_envelopes=dep.receiver.envelopes if dep.receiver else 0)


def run_kyc_celery_burst(n: int, timeout_s: float = 300, *, sentry: bool = True) -> dict[str, Any]:
    """The peer deployed alike: two Celery worker processes × 8 threads already running (INFO
    logging, Sentry as ours: traces at our KYC family's rate, Redis integration off), then a burst
    of `n` webhooks sent the way a Celery caller enqueues them (one task per webhook, as
    `.delay()`), timed from the first send to the last effect committed."""
    with Sandboxed("celeryb") as sb:
        seed_users(sb, n)
        rows = insert_outbox(sb, 0, n, n, relayed=True)  # the effect marker: no relay runs here
        os.environ["BENCH_NAMESPACE"] = sb.namespace
        sys.modules.pop("bench.celery_app", None)  # the key prefix is read at import
        from bench.celery_app import app

        receiver = SentryReceiver() if sentry else None
        env = {"BENCH_CELERY_TRACES_RATE": "0.01"} | ({"SENTRY_DSN": receiver.dsn} if receiver else {})
        procs0 = _process_cpu()
        for p in range(PROCESSES):
            sb.start([sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool", "threads",
                      "--concurrency", str(THREADS), "-Q", "kyc", "-n", f"bench{p}@%h", "--loglevel", "INFO",
                      "--without-gossip", "--without-mingle", "--without-heartbeat"], f"celery{p}", **env)
        _wait_boot(sb.procs[0], sb, "celery0", 5)
        calls = [{**r["payload"], "outbox_id": r["id"]} for r in rows]
        del rows
        t0 = time.perf_counter()
        with cpu_meter() as cpu:
            with app.producer_or_acquire() as producer:
                for kwargs in calls:
                    app.send_task("kyc.sumsub_webhook", kwargs=kwargs, producer=producer)
            sent_s = time.perf_counter() - t0
            progress = Progress(n).watch(lambda: outbox_done(sb), timeout_s, interval=0.05, procs=sb.procs)
        total_s = time.perf_counter() - t0
        cpu_ms = _cpu_ms_per_job(procs0, {f"workers{i}": p.pid for i, p in enumerate(sb.procs)}, progress.done)
        _check_complete(progress, sb, "celery0")
        if receiver is not None:
            receiver.stop()
        return _finish(f"KYC burst of {n:,}, Celery deployed alike (same handler, INFO, "
                       f"{'Sentry' if sentry else 'no Sentry'})", progress, cpu,
                       burst_per_s=round(progress.done / total_s, 1), burst_s=round(total_s, 2),
                       sends_s=round(sent_s, 2), cpu_ms_per_job=cpu_ms,
                       sentry_envelopes=receiver.envelopes if receiver else 0)


def _process_cpu() -> dict:
    from bench.aisp_refresh import _process_cpu as snapshot

    return snapshot()


def _cpu_ms_per_job(before: dict, roles: dict[str, int], jobs_done: int) -> dict[str, float]:
    """CPU milliseconds per job by role (workers, PostgreSQL, Redis, this process, others)."""
    from bench.aisp_refresh import _cpu_by_role

    used = _cpu_by_role(before, _process_cpu(), roles)
    merged: dict[str, float] = {}
    for role, secs in used.items():
        role = "workers" if role.startswith("workers") else role
        merged[role] = merged.get(role, 0.0) + secs
    return {k: round(1000 * v / max(jobs_done, 1), 2) for k, v in merged.items()}


# --- point 4: latency at a steady rate --------------------------------------------------------

_LATENCY_TRIGGER = """
CREATE TABLE bench_done (outbox_id bigint PRIMARY KEY, at timestamptz NOT NULL);
CREATE FUNCTION bench_done_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- clock_timestamp() in a deferred trigger: the moment the effect transaction commits.
    INSERT INTO bench_done VALUES (NEW.id, clock_timestamp()) ON CONFLICT DO NOTHING;
    RETURN NEW;
END $$;
CREATE CONSTRAINT TRIGGER bench_done_at AFTER UPDATE OF done_at ON job_outbox
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.done_at IS NULL AND NEW.done_at IS NOT NULL) EXECUTE FUNCTION bench_done_at();
"""


def run_latency(rate: float = 500, seconds: float = 20, warmup_s: float = 3, *, deployed: bool = True,
                producers: int = 16) -> dict[str, Any]:
    """Enqueue→effect committed at a steady rate: one web-tier style INSERT per webhook (autocommit,
    the row's `created_at` is the enqueue time), from `producers` connections taking turns on one
    schedule, through the relay (which chunks whatever is due in its pass, never waiting for a chunk
    to fill), Redis and a worker; the effect time is taken at the effect transaction's commit by a
    bench-only deferred trigger. `deployed=False`: the bare pool (no Sentry, WARNING logs, no
    scheduler or monitor). `rate=0`: the producers insert as fast as they can for `seconds`
    (the steady capacity of this enqueue shape: effects/s between 10 % and 90 % done)."""
    n = int((rate or 2500) * seconds)
    with Sandboxed("lat") as sb:
        seed_users(sb, n)
        sb.sql(_LATENCY_TRIGGER)
        if deployed:
            dep: Deployed | None = start_deployed(sb)
        else:
            dep = None
            _wait_boot(sb.start_drop_pool(["kyc"]), sb, "drop-pool", 5)
        base_ms = int(time.time() * 1000) - 3_600_000
        payloads = [Jsonb(webhook_payload(i, n, base_ms)) for i in range(n)]
        lags = [0.0] * producers
        t0 = time.perf_counter() + 0.2

        def produce(k: int) -> None:
            with psycopg.connect(sb.db_url, autocommit=True) as conn:
                for i in range(k, n, producers):
                    wait = t0 + i / rate - time.perf_counter() if rate else 0.0
                    if wait > 0:
                        time.sleep(wait)
                    elif rate:
                        lags[k] = max(lags[k], -wait)
                    elif time.perf_counter() - t0 > seconds:
                        return
                    conn.execute("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES (%s, %s, %s)",
                                 ("kyc.sumsub_webhook", payloads[i], f"lat:{i}"))

        procs0 = _process_cpu()
        with cpu_meter() as cpu:
            threads = [threading.Thread(target=produce, args=(k,), daemon=True) for k in range(producers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if not rate:  # what the producers managed in `seconds` is the work
                n = sb.sql("SELECT count(*) FROM job_outbox WHERE job = 'kyc.sumsub_webhook'")[0][0]
            produced_s = time.perf_counter() - t0
            progress = Progress(n).watch(lambda: webhooks_done(sb), 120)
        cpu_ms = _cpu_ms_per_job(procs0, dep.roles if dep else {"workers": sb.procs[0].pid}, progress.done)
        _check_complete(progress, sb, "drop-pool")
        if dep is not None:
            dep.stop()
        # Only the webhooks: the scheduler's rows (inserted at its boot) are not part of the load.
        rows = sb.sql("""SELECT extract(epoch FROM d.at - o.created_at) * 1000,
                                extract(epoch FROM o.created_at - (SELECT min(created_at) FROM job_outbox
                                                                    WHERE job = 'kyc.sumsub_webhook'))
                           FROM job_outbox o JOIN bench_done d ON d.outbox_id = o.id
                          WHERE o.job = 'kyc.sumsub_webhook'""")
        lat = sorted(float(ms) for ms, at in rows if at >= warmup_s)
        # Effects committed per second after warm-up while the producers ran (the capacity when
        # they ran unthrottled), from the commit times themselves.
        landed = sb.sql("""SELECT count(*) FROM bench_done d, (SELECT min(created_at) AS t0 FROM job_outbox
                                                               WHERE job = 'kyc.sumsub_webhook') f
                            WHERE d.at >= f.t0 + %s * interval '1 second'
                              AND d.at < f.t0 + %s * interval '1 second'""", (warmup_s, produced_s))[0][0]
        completed_per_s = landed / max(produced_s - warmup_s, 1e-9)
        # Per half second of enqueue time: the worst latency (is the tail spread out or one stall?).
        worst: dict[int, float] = {}
        for ms, at in rows:
            worst[int(at * 2)] = max(worst.get(int(at * 2), 0.0), float(ms))

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else float("nan")

        figures = {"name": f"latency at {rate:.0f} jobs/s", "rate": rate, "jobs": n, "measured": len(lat),
                   "done": progress.done, "deployed": deployed, "cpu_ms_per_job": cpu_ms, "producers": producers,
                   "offered_per_s": round(n / produced_s, 1),
                   "completed_per_s": round(completed_per_s, 1), "producer_max_lag_ms": round(max(lags) * 1000, 1),
                   "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "max_ms": pct(1.0),
                   "machine_cpu_busy": round(cpu.get("busy", float("nan")), 3), "warmup_s": warmup_s,
                   "worst_per_half_s": [round(worst[k], 1) for k in sorted(worst)]}
        print(f"  latency @ {figures['offered_per_s']}/s offered ({figures['completed_per_s']}/s landed): "
              f"p50 {figures['p50_ms']} ms, p95 {figures['p95_ms']} ms, p99 {figures['p99_ms']} ms, "
              f"max {figures['max_ms']} ms ({len(lat)} jobs; producer lag max "
              f"{figures['producer_max_lag_ms']} ms, CPU {figures['machine_cpu_busy']:.0%})", flush=True)
        return figures


# --- point 7: soak --------------------------------------------------------------------------


def run_soak(total: int, *, window: int = 20_000, users: int = 10_000, timeout_s: float = 3600) -> dict[str, Any]:
    """KYC webhooks in the deployed configuration (start_deployed: chunks, Sentry, INFO, metrics,
    scheduler, monitor), inserted into job_outbox in windows so that at most two windows are
    pending, while the RSS of each worker process is sampled every 2 s. Users repeat (newer
    events apply again), so the tables grow like production's and nothing is skipped as a
    duplicate."""
    import psutil

    with Sandboxed("soak") as sb:
        seed_users(sb, users)
        dep = start_deployed(sb)
        fed = 0

        def feed() -> None:
            nonlocal fed
            take = min(window, total - fed)
            insert_outbox(sb, fed, take, users, relayed=False, returning=False)
            fed += take

        def pending() -> int:  # the partial pending index: cheap however large the table grows
            return sb.sql("SELECT count(*) FROM job_outbox WHERE done_at IS NULL AND error IS NULL")[0][0]

        pids = worker_pids(dep.pool.pid)
        procs = {pid: psutil.Process(pid) for pid in pids}
        samples: list[tuple[float, int, float]] = []  # (s, jobs done, total worker RSS MiB)
        procs0 = _process_cpu()
        feed()
        t0 = time.perf_counter()
        last_sample = 0.0
        while True:
            left = pending()
            done = fed - left
            if fed < total and left < window:
                feed()
                continue
            now = time.perf_counter() - t0
            if now - last_sample >= 2 or done >= total:
                rss = []
                for p in procs.values():
                    try:
                        rss.append(p.memory_info().rss / 2**20)
                    except psutil.Error:
                        rss.append(float("nan"))
                samples.append((now, done, sum(rss)))
                last_sample = now
                if len(samples) % 30 == 0:
                    print(f"  soak: {done}/{total} jobs, {now:.0f} s, worker RSS {sum(rss):.1f} MiB", flush=True)
            if done >= total or now > timeout_s or dep.pool.poll() is not None:
                break
            time.sleep(0.2)
        cpu_ms = _cpu_ms_per_job(procs0, dep.roles, samples[-1][1])
        errors = sb.sql("SELECT count(*) FROM job_outbox WHERE error IS NOT NULL")[0][0]
        dep.stop()
        alive = [p.is_running() for p in procs.values()]
        # Warm-up = the first 10 % of jobs (pools, prepared statements, caches, Sentry's buffers).
        steady = [(d, r) for _, d, r in samples if d >= 0.1 * total]
        slope = _slope(steady)
        warm = steady[0][1] if steady else float("nan")
        elapsed = samples[-1][0]
        figures = {"name": "soak", "jobs": total, "done": samples[-1][1], "elapsed_s": round(elapsed, 1),
                   "per_s": round(samples[-1][1] / elapsed, 1), "processes": len(pids), "all_alive": all(alive),
                   "configuration": "deployed", "rows_in_error": errors, "cpu_ms_per_job": cpu_ms,
                   "rss_start_mib": round(samples[0][2], 1), "rss_after_warmup_mib": round(warm, 1),
                   "rss_end_mib": round(samples[-1][2], 1), "rss_max_mib": round(max(r for *_, r in samples), 1),
                   "rss_max_after_warmup_mib": round(max((r for _, r in steady), default=float("nan")), 1),
                   "max_dev_after_warmup": round(max((abs(r - warm) / warm for _, r in steady), default=float("nan")),
                                                 4),
                   "slope_kib_per_100k_jobs": round(slope * 100_000 * 1024, 1),
                   "samples": [(round(t, 1), d, round(r, 2)) for t, d, r in samples]}
        print(f"  soak: {figures['done']} jobs in {elapsed:.0f} s; worker RSS {figures['rss_start_mib']} → "
              f"{figures['rss_after_warmup_mib']} (after warm-up) → {figures['rss_end_mib']} MiB, max deviation "
              f"after warm-up {figures['max_dev_after_warmup']:.1%}; slope {figures['slope_kib_per_100k_jobs']} KiB "
              f"per 100k jobs", flush=True)
        return figures


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else float("nan")


# --- point 8: profile -----------------------------------------------------------------------


def _profile(leader: int, seconds: float, out: dict[str, Any]) -> None:
    """py-spy (sampling, from outside) on one worker process; folded stacks summarised."""
    time.sleep(2.5)  # past boot: the workers are consuming
    pids = worker_pids(leader)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not pids:
        out["error"] = "no worker process found"
        return
    folded = Path(tempfile.mkdtemp(prefix="drop-bench-spy-")) / "kyc.folded"
    result = subprocess.run([spy, "record", "--pid", str(pids[-1]), "--duration", str(int(seconds)), "--rate", "250",
                             "--format", "raw", "--nonblocking", "--gil", "--output", str(folded)],
                            capture_output=True, text=True, check=False)
    if not folded.exists():
        out["error"] = (result.stderr or result.stdout)[-500:]
        return
    out.update(summarise_folded(folded.read_text()))
    out["folded_path"] = str(folded)


# Buckets for the KYC path, matched on frames (first match from the leaf up wins).
_BUCKETS = [
    ("PostgreSQL round trips (psycopg wait)", ("psycopg/waiting.py", "psycopg_binary", "psycopg/generators.py")),
    ("pool check (SELECT-less ping)", ("check_connection",)),
    ("Redis calls (broker, middleware)",
     ("redis/connection.py", "redis/client.py", "redis/commands", "redis/_parsers")),
    ("Prometheus multiprocess files", ("prometheus_client",)),
    ("JSON encode/decode", ("json/",)),
    ("digest (hmac)", ("hmac.py",)),
    ("logging", ("logging/",)),
]


def summarise_folded(text: str) -> dict[str, Any]:
    """Top frames by inclusive and self samples, and samples by bucket."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")[1:]  # the first entry is the thread
        total += n
        for f in set(frames):
            inclusive[f] += n
        if frames:
            leaf[frames[-1]] += n
        for label, needles in _BUCKETS:
            if any(any(x in f for x in needles) for f in frames):
                buckets[label] += n
                break
        else:
            buckets["other Python (handler, Dramatiq, middleware)"] += n

    def pct(c: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(f, round(100 * v / total, 1)) for f, v in c.most_common(k)] if total else []

    return {"samples": total, "top": pct(inclusive, 25), "leaf": pct(leaf, 12), "buckets": pct(buckets, 10)}


# --- CLI ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench kyc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--noop-jobs", type=int, default=40_000)
    parser.add_argument("--quick", action="store_true", help="small N for development")
    parser.add_argument("--only", choices=["noop", "dnoop", "kyc", "before", "celery", "outbox", "latency", "soak",
                                           "profile"],
                        action="append")
    parser.add_argument("--soak-jobs", type=int, default=30_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.noop_jobs = min(args.jobs, 2000), min(args.noop_jobs, 8000)
    from bench.harness import ensure_servers

    embedded = ensure_servers()
    import jobs.app  # noqa: F401  (the composition root, before any benchmark points it at a namespace)

    only = set(args.only or ["noop", "dnoop", "kyc", "celery", "outbox"])
    results: dict[str, Any] = {}
    try:
        if "noop" in only:
            results["noop"] = run_noop_raw(args.noop_jobs)
        if "dnoop" in only:
            results["dnoop"] = run_noop_drop(args.noop_jobs)
        if "kyc" in only:
            results["kyc"] = run_kyc_drop(args.jobs)
        if "before" in only:
            results["before"] = run_kyc_drop(args.jobs, before=True)
        if "celery" in only:
            results["celery"] = run_kyc_celery(args.jobs)
        if "outbox" in only:
            results["outbox"] = run_kyc_outbox(args.jobs)
        if "latency" in only:
            results["latency"] = run_latency(seconds=8 if args.quick else 20)
        if "soak" in only:
            results["soak"] = run_soak(args.soak_jobs)
        if "profile" in only:
            results["profile"] = run_kyc_drop(max(args.jobs, 6000), profile_s=8)
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
