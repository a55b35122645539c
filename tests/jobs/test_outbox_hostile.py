"""Hostile and careless rows in `job_outbox`: one row must never stop the relay for the others."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import psycopg
import pytest

import jobs
from tests.conftest import wait_for
from tests.monitoring.conftest import receiver, slack  # noqa: F401  (fixtures)
from tests.worker.test_pool import start_pool_and_wait
from worker.relay import drain, relay_once, relays_alive, run_relay

DEEP = '{"a":' * 2000 + "1" + "}" * 2000  # jsonb accepts it; Python's json.loads recurses too deep
HUGE_INT = '{"n": ' + "7" * 5000 + "}"  # jsonb accepts it; Python refuses ints over 4,300 digits


def insert_raw(sql, job: str, payload_text: str, key: str) -> None:
    sql("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES (%s, %s::jsonb, %s)", (job, payload_text, key))


def test_poison_rows_deep_json_and_huge_integers_do_not_stop_the_relay(db, sql, broker, slack):  # noqa: F811
    poison = 50
    for i in range(poison):
        insert_raw(sql, "sca.expire_timeouts", DEEP if i % 2 else HUGE_INT, f"poison-{i}")
        jobs.enqueue("sca.expire_timeouts", {}, idempotency_key=f"good-{i}")
    assert drain() == poison  # every good row moves; before the fix this raised RecursionError
    rows = sql("SELECT idempotency_key, relayed_at, error FROM job_outbox ORDER BY id")
    good = [r for r in rows if r["idempotency_key"].startswith("good-")]
    bad = [r for r in rows if r["idempotency_key"].startswith("poison-")]
    assert all(r["relayed_at"] is not None and r["error"] is None for r in good)
    assert {r["error"] for r in bad} == {"payload is nested too deeply to decode",
                                         "payload cannot be decoded (ValueError)"}
    # Nested just shallow enough to decode, too deep to be sure it encodes again: closed too.
    insert_raw(sql, "sca.expire_timeouts", '{"a":' * 500 + "1" + "}" * 500, "poison-500-deep")
    assert drain() == 0
    assert sql("SELECT error FROM job_outbox WHERE idempotency_key = 'poison-500-deep'")[0]["error"] == \
        "payload is nested deeper than 64 levels"
    assert all(r["relayed_at"] is None for r in bad)
    # On-call hears of it once (deduplicated), by the existing rejected-rows alert.
    message = json.dumps(slack.wait(1)[0].json())
    assert "Outbox rows rejected" in message
    assert drain() == 0  # closed rows are not picked up again
    assert len(slack.requests) == 1


def test_relay_loop_survives_an_unexpected_exception(db, sql, broker, monkeypatch):
    import worker.relay as outbox

    real, calls = outbox.check_broker_epoch, []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug nobody foresaw")
        return real()

    monkeypatch.setattr(outbox, "check_broker_epoch", flaky)
    stop = threading.Event()
    thread = threading.Thread(target=run_relay, kwargs={"stop_after": 20, "stop": stop}, daemon=True)
    thread.start()
    try:
        jobs.enqueue("sca.expire_timeouts", {}, idempotency_key="after-the-bug")
        wait_for(lambda: sql("SELECT relayed_at FROM job_outbox")[0]["relayed_at"], timeout=15,
                 what="the relay to come back after an unexpected exception")
        assert thread.is_alive() and len(calls) >= 2
    finally:
        stop.set()  # it must not outlive the test: it would relay the next test's rows
        thread.join(10)
    assert not thread.is_alive()


def test_a_dead_relay_fork_takes_its_pool_down_for_a_restart(db, redis_namespace, tmp_path, monkeypatch):
    monkeypatch.setenv("DROP_RELAY_SILENT_LIMIT_S", "5")
    proc, _tree = start_pool_and_wait(db, redis_namespace, tmp_path)
    try:
        beats = wait_for(lambda: list(tmp_path.glob("relay-heartbeat-*")), timeout=30, what="relay heartbeat file")
        relay_pid = int(wait_for(lambda: Path(beats[0]).read_text(), timeout=10, what="relay pid"))
        wait_for(lambda: relays_alive() >= 1, timeout=10, what="relay heartbeat in Redis")
        os.kill(relay_pid, signal.SIGKILL)  # Dramatiq's master never restarts a fork that died
        assert proc.wait(timeout=60) == 75  # the wrapper stopped the pool: the process manager restarts it
        assert "outbox relay has not beaten" in (tmp_path / "pool.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_oversized_payload_is_refused_at_the_door(db, sql):
    body = "x" * (50 * 1024 * 1024)
    with pytest.raises(psycopg.errors.CheckViolation, match="job_outbox_payload_size"), \
            psycopg.connect(db, autocommit=True) as conn:
        conn.execute("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES (%s, %s::jsonb, %s)",
                     ("kyc.sumsub_webhook", json.dumps({"body": body}), "huge"))
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 0
    # At the limit, still accepted.
    # (a job that takes any field: the size is the point here)
    jobs.enqueue("kyc.sumsub_webhook", {"pad": "y" * (2 * 1024 * 1024 - 20)}, idempotency_key="at-limit")


def test_relay_batch_respects_its_byte_budget(db, sql, broker):
    for i in range(10):
        jobs.enqueue("kyc.sumsub_webhook", {"pad": "z" * (1536 * 1024)}, idempotency_key=f"big-{i}")
    first = relay_once(byte_budget=4 * 1024 * 1024)
    assert (first.sent, first.more) == (2, True)  # 2 × 1.5 MiB fit in 4 MiB, the third would not
    assert drain() == 8
    assert sql("SELECT count(*) AS n FROM job_outbox WHERE relayed_at IS NOT NULL")[0]["n"] == 10


def test_slack_injection_through_a_job_name_pings_nobody(db, sql, broker, slack):  # noqa: F811
    evil = "<!channel> <https://evil.example|click> & " + "x" * 100
    insert_raw(sql, evil, "{}", "evil-name")
    drain()
    payload = slack.wait(1)[0].json()
    for text in (payload["text"], payload["blocks"][1]["text"]["text"]):
        assert "<!channel>" not in text and "<https://evil.example" not in text
        assert "&lt;!channel&gt; &lt;https://evil.example|click&gt; &amp;" in text
        assert len(text) < 3000  # values are cut, the message stays within Slack's section limit
    # The runbook link is still a real link: only values are escaped, not drop-worker's own layout.
    assert "|outbox-rows-rejected>" in payload["blocks"][1]["text"]["text"] or "Runbook" in payload["text"]
