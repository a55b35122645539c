"""GET /v1/health and GET /metrics of the real monitor HTTP server, against real PostgreSQL/Redis."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import dramatiq
import pytest
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture
def monitor(db) -> Iterator[str]:
    from monitoring.server import serve

    server = serve("127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def heartbeat_scheduler() -> None:
    from worker.redis_client import get_redis, key

    get_redis().set(key("scheduler", "leader"),
                    json.dumps({"leader": "test", "since": time.time(), "heartbeat": time.time()}), ex=30)


def test_health_ok_when_everything_is_fine(monitor, worker):
    from worker.relay import beat

    heartbeat_scheduler()
    beat(None)
    from tests.conftest import wait_for

    wait_for(lambda: get(f"{monitor}/v1/health")[0] == 200, timeout=10, what="healthy")
    status, body = get(f"{monitor}/v1/health")
    data = json.loads(body)
    assert status == 200 and data["status"] == "ok"
    assert set(data["checks"]) == {"postgres", "redis", "scheduler", "workers", "relay"}
    assert data["checks"]["workers"]["alive"] >= 1


def test_health_503_names_each_failing_check(monitor):
    # No scheduler heartbeat, no worker and no outbox relay running.
    status, body = get(f"{monitor}/v1/health")
    data = json.loads(body)
    assert status == 503 and data["status"] == "fail"
    assert data["failing"] == ["relay", "scheduler", "workers"]
    assert "relay" in data["checks"]["relay"]["reason"]
    assert "heartbeat" in data["checks"]["scheduler"]["reason"]


@pytest.mark.parametrize("dependency", ["redis", "postgres"])
def test_health_answers_within_a_second_when_a_dependency_hangs(monitor, blackhole, monkeypatch, dependency):
    from db.pool import close_pool
    from worker.redis_client import reset_redis
    from worker.settings import get_settings

    if dependency == "redis":
        monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{blackhole}/0")
    else:
        monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{blackhole}/test")
    get_settings.cache_clear()
    reset_redis()
    close_pool()
    for _ in range(3):  # repeated probes while it hangs: still fast, no thread pile-up
        started = time.monotonic()
        status, body = get(f"{monitor}/v1/health")
        assert time.monotonic() - started < 1.0
        data = json.loads(body)
        assert status == 503
        assert dependency in data["failing"]
        assert "timeout" in data["checks"][dependency]["reason"].lower()


def metrics(monitor: str) -> dict[tuple[str, tuple], float]:
    status, body = get(f"{monitor}/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_system_metrics(monitor, sql):
    from worker.breaker import get_breaker

    sql("INSERT INTO users (id) VALUES ('u1')")
    sql("""INSERT INTO screening_results (user_id, screening_type, result, created_at)
           SELECT 'u1', 'kyc', r, now() - interval '10 minutes'
             FROM unnest(ARRAY['approved','approved','approved','rejected','retry']) r""")
    sql("""INSERT INTO screening_results (user_id, screening_type, result, created_at)
           VALUES ('u1', 'kyc', 'rejected', now() - interval '2 hours'),
                  ('u1', 'aml', 'rejected', now())""")
    sql("""INSERT INTO bank_accounts (id, user_id, provider_account_id, balance_synced_at, needs_relink)
           VALUES ('a1', 'u1', 'p1', now() - interval '7 hours', false),
                  ('a2', 'u1', 'p2', now() - interval '1 hour', false),
                  ('a3', 'u1', 'p3', now() - interval '30 days', true)""")
    sql("""INSERT INTO job_outbox (job, idempotency_key, available_at)
           VALUES ('x.y', 'k1', now() - interval '10 minutes'), ('x.y', 'k2', now())""")
    sql("""INSERT INTO dead_letters (message_id, job, queue_name, message, reason)
           VALUES ('m1', 'kyc.sumsub_webhook', 'default', '{}', 'r')""")
    sql("""INSERT INTO scheduler_fires (job, slot, leader, outbox_id)
           VALUES ('sca.expire_timeouts', '2026-01-01T10:00:00Z', 'l', 1)""")
    get_breaker("neonomics_pisp").open()

    m = metrics(monitor)
    assert m[("kyc_approval_rate", ())] == pytest.approx(3 / 5)
    assert m[("drop_kyc_reviews_last_hour", ())] == 5
    assert m[("pisp_circuit_open", ())] == 1
    assert m[("drop_circuit_breaker_open", (("breaker", "neonomics_pisp"),))] == 1
    assert m[("drop_circuit_breaker_open", (("breaker", "sumsub"),))] == 0
    assert 7 * 3600 - 60 < m[("drop_aisp_balance_staleness_seconds", ())] < 7 * 3600 + 60
    assert m[("drop_outbox_backlog", ())] == 2
    assert m[("drop_outbox_oldest_age_seconds", ())] >= 590
    assert m[("drop_dead_letters", ())] == 1
    assert m[("drop_schedule_last_fire_timestamp_seconds", (("schedule", "sca.expire_timeouts"),))] == 1767261600
    assert m[("drop_scheduler_leader_up", ())] == 0
    assert m[("drop_workers_alive", ())] == 0
    assert all(m[("drop_monitor_probe_up", (("probe", p),))] == 1 for p in ("redis", "postgres", "breakers"))
    # No user ids in any label.
    assert not any("u1" in str(labels) for _, labels in m)


def test_kyc_rate_absent_without_reviews(monitor):
    m = metrics(monitor)
    assert ("kyc_approval_rate", ()) not in m
    assert m[("drop_kyc_reviews_last_hour", ())] == 0
    assert m[("pisp_circuit_open", ())] == 0


# Declared at import: a queue declared after a test's Worker stopped would get a consumer from
# that stopped Worker's middleware (it stays on the shared test broker).
@dramatiq.actor(queue_name="monitoring_probe_test")
def probe_job() -> None:
    pass


def test_queue_depth_and_oldest_message_age(monitor, broker):
    probe_job.send()
    time.sleep(1.1)
    probe_job.send()
    m = metrics(monitor)
    assert m[("drop_queue_depth", (("queue", "monitoring_probe_test"),))] == 2
    assert m[("drop_queue_oldest_message_age_seconds", (("queue", "monitoring_probe_test"),))] >= 1.0


def test_slowloris_idle_connections_do_not_stop_health(monitor):
    import socket

    host, port = monitor.removeprefix("http://").split(":")
    idle = []
    try:
        for _ in range(200):  # each sends half a request line and then nothing
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            idle.append(s)
        started = time.monotonic()
        status, _ = get(f"{monitor}/v1/health")
        took = time.monotonic() - started
        print(f"health with 200 idle connections answered {status} in {took * 1000:.0f} ms")
        assert status in (200, 503) and took < 3.0  # the checks' own deadline is 0.8 s
    finally:
        for s in idle:
            s.close()
