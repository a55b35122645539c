"""Issue 9 points 2 and 3: Redis loss and a PostgreSQL restart mid-run.

The shared servers are never flushed or restarted: Redis loss deletes this test's namespace
(what FLUSHALL does to it); `make chaos` also really restarts a private redis-server without
persistence, and the PostgreSQL restart uses a private cluster on a free port.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import wait_for

from . import workload
from .conftest import PrivatePostgres, PrivateRedis, figure, free_port, lose_redis, scaled


def done_count(sql) -> int:
    return sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL")[0]["n"]


def sql_at(url: str):
    """A `sql(query, params)` helper for a private server (the `sql` fixture is the shared one's)."""

    def sql(query, params=None):
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    return sql


def workload_done(sql) -> int:
    """Done rows of the workload (a running scheduler adds rows of its own)."""
    return sql(f"SELECT count(*) AS n FROM {workload.WORKLOAD_ROWS} AND done_at IS NOT NULL")[0]["n"]


def test_redis_loss_mid_run_completes_everything_once(db, sql, sandbox, procs, capture, redis_namespace):
    w = workload.build(db, sandbox, capture.seeds, kyc=scaled(300), payments=scaled(100), accounts=scaled(100),
                       spread_s=10 * min(scaled(1), 5))
    capture.bodies += w.bodies
    sandbox.fault("neonomics.*", latency_ms=100)
    procs.worker(threads=4)
    procs.worker(threads=4)
    wait_for(lambda: done_count(sql) >= w.jobs // 4, timeout=60, what="a quarter done")
    at_loss = done_count(sql)
    deleted = lose_redis(redis_namespace)  # queues, delayed messages, acks, breaker state, epoch
    lost_at = time.monotonic()
    wait_for(lambda: done_count(sql) == w.jobs, timeout=120, interval=0.2, what="everything after the loss")
    recovered = time.monotonic() - lost_at
    c = workload.assert_exact(sql, w, sandbox)
    assert len(w.payments) <= c["status_requests"]
    figure("redis_loss", jobs=w.jobs, done_at_loss=at_loss, keys_deleted=deleted, all_done_after_s=round(recovered, 1),
           status_requests=c["status_requests"], balance_requests=c["balance_requests"], aisp_ledger=c["aisp_ledger"])


@pytest.mark.chaos_long
def test_private_redis_really_restarted_without_persistence(db, sql, sandbox, procs, capture):
    server = PrivateRedis()
    try:
        w = workload.build(db, sandbox, capture.seeds, kyc=scaled(300), payments=scaled(100),
                           accounts=scaled(100), spread_s=20)
        capture.bodies += w.bodies
        env = {"REDIS_URL": server.url}
        procs.worker(threads=4, **env)
        procs.worker(threads=4, **env)
        wait_for(lambda: done_count(sql) >= w.jobs // 4, timeout=60, what="a quarter done")
        server.kill()
        time.sleep(2)
        server.start()  # empty: no RDB, no AOF
        restarted = time.monotonic()
        wait_for(lambda: done_count(sql) == w.jobs, timeout=180, interval=0.2, what="everything after restart")
        c = workload.assert_exact(sql, w, sandbox)
        figure("redis_restart", jobs=w.jobs, all_done_after_s=round(time.monotonic() - restarted, 1),
               status_requests=c["status_requests"], balance_requests=c["balance_requests"])
    finally:
        server.kill()


def health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


def test_postgres_restart_mid_run_loses_nothing_and_alerts(sandbox, procs, capture, redis_namespace):
    from db.migrate import migrate

    pg = PrivatePostgres()
    try:
        migrate(pg.url)
        sql = sql_at(pg.url)
        w = workload.build(pg.url, sandbox, capture.seeds, kyc=scaled(200), payments=scaled(60),
                           accounts=scaled(60), spread_s=15)
        capture.bodies += w.bodies
        sandbox.fault("neonomics.*", latency_ms=100)
        env = {"DATABASE_URL": pg.url}
        procs.worker(threads=4, **env)
        port = free_port()
        procs.spawn([sys.executable, "-m", "monitoring"], "monitor", DATABASE_URL=pg.url,
                    DROP_MONITOR_PORT=str(port), DROP_MONITOR_EVAL_INTERVAL_S="1")
        wait_for(lambda: health(port)[1].get("checks", {}).get("postgres", {}).get("ok"), timeout=30,
                 what="monitor up, postgres ok")
        wait_for(lambda: done_count(sql) >= w.jobs // 5, timeout=60, what="a fifth done")
        stopped = time.monotonic()
        pg.stop("immediate")  # a crash-like stop: connections cut, no checkpoint
        _code, body = wait_for(lambda: (lambda h: h if h[0] == 503 else None)(health(port)), timeout=15,
                              what="health 503")
        health_503_after = time.monotonic() - stopped
        assert "postgres" in body["failing"]
        capture.slack.wait(1, timeout=15)
        wait_for(lambda: any("PostgreSQL unreachable" in r.body.decode() for r in capture.slack.requests),
                 timeout=15, what="Slack alert")
        alert_after = time.monotonic() - stopped
        time.sleep(3)
        pg.start()
        back = time.monotonic()
        wait_for(lambda: health(port)[1].get("checks", {}).get("postgres", {}).get("ok"), timeout=30,
                 what="health postgres ok again")
        health_ok_after = time.monotonic() - back
        wait_for(lambda: any("Resolved: PostgreSQL unreachable" in r.body.decode() for r in capture.slack.requests),
                 timeout=20, what="Slack resolution")
        resolved_after = time.monotonic() - back
        wait_for(lambda: done_count(sql) == w.jobs, timeout=120, interval=0.3, what="everything after the restart")
        all_done_after = time.monotonic() - back
        c = workload.assert_exact(sql, w, sandbox)
        figure("postgres_restart", jobs=w.jobs, outage_s=round(back - stopped, 1),
               health_503_after_s=round(health_503_after, 1), slack_alert_after_s=round(alert_after, 1),
               health_ok_after_restart_s=round(health_ok_after, 1), slack_resolved_after_s=round(resolved_after, 1),
               all_done_after_restart_s=round(all_done_after, 1), status_requests=c["status_requests"],
               balance_requests=c["balance_requests"])
    finally:
        procs.stop_all()
        pg.destroy()


def test_postgres_failover_to_a_second_address_through_a_multi_host_url(sandbox, procs, capture, redis_namespace):
    """Issue 17 item 3: DATABASE_URL lists two addresses (libpq multi-host, read-write target);
    the database stops at the first and comes back at the second, as after a failover to a
    standby's address. Every process finds it by itself; every effect lands once."""
    from db.migrate import migrate

    pg = PrivatePostgres()
    first, second = pg.port, free_port()
    url = f"postgresql://postgres@127.0.0.1:{first},127.0.0.1:{second}/postgres?target_session_attrs=read-write"
    try:
        migrate(pg.url)
        sql = sql_at(url)
        w = workload.build(pg.url, sandbox, capture.seeds, kyc=scaled(200), payments=scaled(60),
                           accounts=scaled(60), spread_s=15)
        capture.bodies += w.bodies
        sandbox.fault("neonomics.*", latency_ms=100)
        procs.worker(threads=4, DATABASE_URL=url)
        procs.spawn([sys.executable, "scheduler.py"], "scheduler", DATABASE_URL=url, DROP_SCHEDULER_METRICS_PORT="0")
        port = free_port()
        procs.spawn([sys.executable, "-m", "monitoring"], "monitor", DATABASE_URL=url,
                    DROP_MONITOR_PORT=str(port), DROP_MONITOR_EVAL_INTERVAL_S="1")
        wait_for(lambda: health(port)[1].get("checks", {}).get("postgres", {}).get("ok"), timeout=30,
                 what="monitor up, postgres ok")
        wait_for(lambda: workload_done(sql) >= w.jobs // 5, timeout=60, what="a fifth done")
        stopped = time.monotonic()
        pg.stop("immediate")
        wait_for(lambda: health(port)[0] == 503, timeout=15, what="health 503")
        time.sleep(2)
        pg.port = second  # the same data, now answering at the second address only
        pg.start()
        back = time.monotonic()
        wait_for(lambda: health(port)[1].get("checks", {}).get("postgres", {}).get("ok"), timeout=30,
                 what="health postgres ok at the second address")
        health_ok_after = time.monotonic() - back
        done_at_back = workload_done(sql)
        wait_for(lambda: workload_done(sql) > done_at_back, timeout=60, interval=0.2, what="a job done after the move")
        first_job_after = time.monotonic() - back
        wait_for(lambda: workload_done(sql) == w.jobs, timeout=120, interval=0.3, what="everything after the move")
        all_done_after = time.monotonic() - back
        c = workload.assert_exact(sql, w, sandbox)
        fired = sql("SELECT count(*) AS n, count(DISTINCT (job, slot)) AS distinct_slots FROM scheduler_fires")[0]
        assert fired["n"] == fired["distinct_slots"]  # no slot fired twice across the move
        figure("postgres_second_address", jobs=w.jobs, outage_s=round(back - stopped, 1),
               health_ok_after_s=round(health_ok_after, 1), first_job_after_s=round(first_job_after, 1),
               all_done_after_s=round(all_done_after, 1), lost=w.jobs - c["done"], doubled=0)
    finally:
        procs.stop_all()
        pg.destroy()
