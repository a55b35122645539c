"""Issue 17 item 2: REDIS_URL names a Sentinel-managed primary; the primary is SIGKILLed
mid-run, Sentinel promotes the replica, work continues, every effect lands exactly once, and
`/v1/health` and Slack report the outage and its end. Real redis-server and redis-sentinel."""

from __future__ import annotations

import sys
import time

import redis

from tests.conftest import wait_for

from . import workload
from .conftest import PrivateRedis, PrivateSentinel, figure, free_port, scaled
from .test_outages import done_count, health


def test_sentinel_failover_mid_run_loses_and_doubles_nothing(db, sql, sandbox, procs, capture):
    primary = PrivateRedis()
    replica = PrivateRedis(extra=("--replicaof", "127.0.0.1", str(primary.port)))
    sentinel = None
    try:
        wait_for(lambda: redis.Redis(port=replica.port).info("replication").get("master_link_status") == "up",
                 timeout=20, what="replica in sync")
        sentinel = PrivateSentinel(primary, down_after_ms=2000)
        url = sentinel.url()
        w = workload.build(db, sandbox, capture.seeds, kyc=scaled(300), payments=scaled(100),
                           accounts=scaled(100), spread_s=15)
        capture.bodies += w.bodies
        sandbox.fault("neonomics.*", latency_ms=100)
        procs.worker(threads=4, REDIS_URL=url)
        procs.worker(threads=4, REDIS_URL=url)
        port = free_port()
        procs.spawn([sys.executable, "-m", "monitoring"], "monitor", REDIS_URL=url, DROP_MONITOR_PORT=str(port),
                    DROP_MONITOR_EVAL_INTERVAL_S="0.5")
        wait_for(lambda: health(port)[1].get("checks", {}).get("redis", {}).get("ok"), timeout=30,
                 what="monitor up, redis ok through Sentinel")
        wait_for(lambda: done_count(sql) >= w.jobs // 4, timeout=90, what="a quarter done")

        primary.kill()  # SIGKILL: the replica has whatever was replicated, nothing more
        killed = time.monotonic()
        done_at_kill = done_count(sql)
        _code, body = wait_for(lambda: (lambda h: h if h[0] == 503 else None)(health(port)), timeout=15,
                               interval=0.1, what="health 503 naming redis")
        assert "redis" in body["failing"]
        health_503_after = time.monotonic() - killed
        wait_for(lambda: sentinel.primary_port() == replica.port, timeout=30, interval=0.1, what="promotion")
        promoted_after = time.monotonic() - killed
        done_at_promotion = done_count(sql)
        wait_for(lambda: done_count(sql) > done_at_promotion, timeout=60, interval=0.1,
                 what="a job completed after the promotion")
        first_job_after = time.monotonic() - killed
        wait_for(lambda: health(port)[1].get("checks", {}).get("redis", {}).get("ok"), timeout=30,
                 what="health redis ok again")
        wait_for(lambda: any("Redis unreachable" in r.body.decode() for r in capture.slack.requests),
                 timeout=20, what="Slack alert")
        wait_for(lambda: any("Resolved: Redis unreachable" in r.body.decode() for r in capture.slack.requests),
                 timeout=30, what="Slack resolution")
        wait_for(lambda: done_count(sql) == w.jobs, timeout=180, interval=0.3, what="everything after failover")
        all_done_after = time.monotonic() - killed
        c = workload.assert_exact(sql, w, sandbox)
        figure("sentinel_failover", jobs=w.jobs, done_at_kill=done_at_kill,
               health_503_after_s=round(health_503_after, 1), promoted_after_s=round(promoted_after, 1),
               first_job_after_failover_s=round(first_job_after, 1), all_done_after_s=round(all_done_after, 1),
               lost=w.jobs - c["done"], doubled=0, status_requests=c["status_requests"],
               balance_requests=c["balance_requests"])
    finally:
        procs.stop_all()
        if sentinel is not None:
            sentinel.kill()
        primary.kill()
        replica.kill()
