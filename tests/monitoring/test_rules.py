"""The monitor's alert loop: error spike across workers, breakers, dead letters, dedup across replicas."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dramatiq

from monitoring.rules import Evaluator, breakers, database, error_spike, redis_state
from tests.conftest import wait_for
from worker.probes import job_errors, record_job_error

ROOT = Path(__file__).resolve().parents[2]


@dramatiq.actor(max_retries=0, queue_name="monitoring_rules_test")
def failing_job() -> None:
    raise RuntimeError("provider said no")


@dramatiq.actor(max_retries=0, queue_name="monitoring_rules_test")
def retrying_job() -> None:
    raise dramatiq.errors.Retry("later", delay=60_000)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_error_spike_counts_errors_across_worker_processes(slack, worker, broker):
    # Three errors from this process's worker, three from another process (another machine).
    for _ in range(3):
        failing_job.send()
    wait_for(lambda: sum(job_errors().values()) >= 3, what="3 job errors counted")
    child = run_child("""
        from worker.probes import record_job_error
        for i in range(3):
            record_job_error("kyc.sumsub_webhook", f"other-{i}")
    """)
    assert child.wait(30) == 0, child.stderr.read()
    evaluator = Evaluator(rules=(error_spike,))
    assert evaluator.evaluate()["error-spike"] == "sent"
    text = slack.wait(1)[0].json()["text"]
    assert "Error spike detected" in text
    assert "6 job errors in the last 60 seconds" in text
    assert "failing_job: 3" in text and "kyc.sumsub_webhook: 3" in text


def test_error_spike_threshold_is_more_than_five(slack, broker):
    for i in range(5):
        record_job_error("x", str(i))
    assert Evaluator(rules=(error_spike,)).evaluate()["error-spike"] == "ok"
    record_job_error("x", "6")
    assert Evaluator(rules=(error_spike,)).evaluate()["error-spike"] == "sent"


def test_retry_requests_are_not_errors(worker, broker):
    retrying_job.send()
    failing_job.send()
    wait_for(lambda: job_errors().get("failing_job") == 1, what="the failing job counted")
    assert "retrying_job" not in job_errors()


def test_breaker_open_alert_deduplicated_across_two_monitor_processes_and_resolved_once(slack, db):
    from worker.breaker import get_breaker

    get_breaker("neonomics_pisp").open()
    code = """
        from worker import alerts
        from monitoring.rules import Evaluator, breakers
        print(Evaluator(rules=(breakers,)).evaluate()["breaker-open:neonomics_pisp"])
        alerts.flush(5)
    """
    replicas = [run_child(code) for _ in range(2)]
    outcomes = sorted(p.communicate(timeout=30)[0].strip() for p in replicas)
    assert outcomes == ["sent", "suppressed"], outcomes
    [opened] = slack.wait(1)
    assert "🚨 Drop Development Alert — Critical" in opened.json()["text"]
    assert "Circuit breaker open: neonomics_pisp" in opened.json()["text"]
    assert "#circuit-breaker-open" in opened.json()["text"]

    get_breaker("neonomics_pisp").close()
    replicas = [run_child(code) for _ in range(2)]
    outcomes = sorted(p.communicate(timeout=30)[0].strip() for p in replicas)
    assert outcomes == ["ok", "resolved"], outcomes
    texts = [r.json()["text"] for r in slack.wait(2)]
    assert texts[1].startswith("✅") and "Resolved: Circuit breaker open: neonomics_pisp" in texts[1]
    assert len(slack.requests) == 2


def test_dead_letters_alert_and_resolve(slack, sql):
    sql("""INSERT INTO dead_letters (message_id, job, queue_name, message, reason)
           VALUES ('m1', 'kyc.sumsub_webhook', 'default', '{}', 'UnknownApplicant')""")
    ev = Evaluator(rules=(database,))
    assert ev.evaluate()["dead-letters"] == "sent"
    assert ev.evaluate()["dead-letters"] == "suppressed"
    sql("UPDATE dead_letters SET replayed_at = now()")
    assert ev.evaluate()["dead-letters"] == "resolved"
    texts = [r.json()["text"] for r in slack.wait(2)]
    assert "🔥" in texts[0] and "kyc.sumsub_webhook: 1" in texts[0]


def test_outbox_stuck(slack, sql):
    sql("INSERT INTO job_outbox (job, idempotency_key, available_at) VALUES ('x', 'k', now() - interval '6 minutes')")
    ev = Evaluator(rules=(database,))
    assert ev.evaluate()["outbox-stuck"] == "pending"  # a restart's old backlog gets a minute to drain
    ev.pending["outbox-stuck"] -= 61  # as if it had not drained for a minute
    assert ev.evaluate()["outbox-stuck"] == "sent"
    assert "Outbox stuck" in slack.wait(1)[0].json()["text"]


def test_a_backlog_drained_right_after_a_restart_wakes_nobody(slack, sql):
    sql("INSERT INTO job_outbox (job, idempotency_key, available_at) VALUES ('x', 'k', now() - interval '6 minutes')")
    ev = Evaluator(rules=(database,))
    assert ev.evaluate()["outbox-stuck"] == "pending"
    sql("UPDATE job_outbox SET done_at = now()")  # the relay and workers caught up within the minute
    assert ev.evaluate()["outbox-stuck"] == "ok"
    assert slack.requests == []


def test_scheduler_silent_waits_for_its_for_duration(slack, db):
    ev = Evaluator(rules=(redis_state,))
    assert ev.evaluate()["scheduler-silent"] == "pending"
    ev.pending["scheduler-silent"] -= 61  # as if a minute had passed without a heartbeat
    assert ev.evaluate()["scheduler-silent"] == "sent"
    assert "Scheduler silent" in slack.wait(1)[0].json()["text"]


def test_a_failing_probe_never_resolves(slack, db, monkeypatch):
    from worker.breaker import get_breaker

    get_breaker("sumsub").open()
    assert Evaluator(rules=(breakers,)).evaluate()["breaker-open:sumsub"] == "sent"
    monkeypatch.setattr("worker.probes.breaker_statuses", lambda: 1 / 0)
    assert "breaker-open:sumsub" not in Evaluator(rules=(breakers,)).evaluate()
    assert len(slack.wait(1)) == 1
