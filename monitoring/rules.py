"""The monitor's alert loop: evaluate the system's state every few seconds, alert and resolve.

Each rule looks at one probe and yields conditions (key, severity, firing?). A firing condition
that has held for its `for_s` raises `send_alert(key=…)` — deduplicated across monitor replicas
by Redis, re-sent only after the cooldown while it keeps firing; a condition that stops firing
sends one "resolved". A probe that fails yields nothing, so "unknown" never resolves an alert.

Thresholds follow docs/monitoring.md; docs/runbook.md has a section per key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jobs
from monitoring.health import check_postgres, check_redis
from worker import probes
from worker.alerts import Severity, active_since, forget_once, once, resolve_alert, send_alert
from worker.probes import ERROR_WINDOW_S
from worker.sentry import capture_alert
from worker.settings import get_settings

log = logging.getLogger("monitor.rules")

BREAKER_LONG_OPEN_S = 300  # open > 5 min → Sentry HIGH (docs/monitoring.md)
SCHEDULER_SILENT_FOR_S = 60
WORKERS_DOWN_FOR_S = 60
OUTBOX_STUCK_AGE_S = 300
# After a restart the relay finds rows that waited while nothing ran (older than the age above)
# and drains them in seconds: the backlog must stay that old this long before on-call is woken.
OUTBOX_STUCK_FOR_S = 60
QUEUE_LATENCY_S = 300
KYC_MIN_RATE = 0.7
KYC_MIN_REVIEWS = 10  # below this an hour's rate is noise
AISP_STALE_S = 6 * 3600


@dataclass(frozen=True)
class Condition:
    key: str
    firing: bool
    severity: Severity
    title: str
    message: str = ""
    runbook: str | None = None
    for_s: float = 0.0
    cooldown_s: float | None = None
    sentry: bool = True


Rule = Callable[[], Iterator[Condition]]


def error_spike() -> Iterator[Condition]:
    threshold = get_settings().error_spike_threshold
    counts = probes.job_errors()
    total = sum(counts.values())
    top = ", ".join(f"{job}: {n}" for job, n in sorted(counts.items(), key=lambda kv: -kv[1])[:5])
    yield Condition(
        "error-spike", total > threshold, Severity.CRITICAL, "Error spike detected",
        f"{total} job errors in the last {ERROR_WINDOW_S} seconds across all workers ({top}).",
        runbook="error-spike", cooldown_s=600,
    )


def breakers() -> Iterator[Condition]:
    for name, status in probes.breaker_statuses().items():
        key = f"breaker-open:{name}"
        message = (f"Calls to {name} fail fast: transient provider failures opened the circuit "
                   f"({status.state}). Jobs keep their cached state and retry later.")
        yield Condition(key, status.is_open, Severity.CRITICAL, f"Circuit breaker open: {name}", message,
                        runbook="circuit-breaker-open", sentry=False)
        # docs/monitoring.md: open for more than 5 minutes → a HIGH event in Sentry (once per incident).
        if status.is_open:
            since = active_since(key)
            if since is not None and time.time() - since > BREAKER_LONG_OPEN_S and once(f"long-open:{name}", 86_400):
                minutes = int((time.time() - since) // 60)
                opened = time.strftime("%H:%M UTC", time.gmtime(since))
                capture_alert("high", f"Circuit breaker {name} open for {minutes} min",
                              f"{name} has been open or half-open since {opened}",
                              alert_key=f"breaker-long-open:{name}")
                log.error("circuit breaker %s open for %d min (reported to Sentry as HIGH)", name, minutes)
        else:
            forget_once(f"long-open:{name}")


def redis_state() -> Iterator[Condition]:
    yield Condition(
        "scheduler-silent", probes.scheduler_leader() is None, Severity.CRITICAL, "Scheduler silent",
        "No scheduler leader heartbeat for 30 s: periodic jobs (SCA expiry, payment sweeps, AISP "
        "refresh) are not being enqueued.",
        runbook="scheduler-silent", for_s=SCHEDULER_SILENT_FOR_S,
    )
    alive = probes.workers_alive()
    yield Condition(
        "workers-down", alive < 1, Severity.CRITICAL, "No workers alive",
        "No Dramatiq worker heartbeat in the last 30 s: jobs queue up but nothing runs them.",
        runbook="workers-down", for_s=WORKERS_DOWN_FOR_S,
    )
    stats = probes.queue_stats(probes.queues(jobs.registry.queues()))
    ages = probes.queue_oldest_age([q["queue"] for q in stats])
    slow = {q: a for q, a in ages.items() if a > QUEUE_LATENCY_S}
    yield Condition(
        "queue-latency", bool(slow), Severity.WARNING, "Queue latency high",
        "Oldest waiting message: " + ", ".join(f"{q} {int(a)} s" for q, a in sorted(slow.items())),
        runbook="queue-latency", for_s=60,
    )


def _unreachable(check: Callable[[], object], key: str, title: str, consequence: str,
                 runbook: str) -> Condition:
    try:
        check()
        down, reason = False, ""
    except Exception as error:
        down, reason = True, type(error).__name__
    what = title.removesuffix(" unreachable")
    return Condition(key, down, Severity.CRITICAL, title,
                     f"The monitor cannot reach {what} ({reason}): {consequence}", runbook=runbook)


def postgres_state() -> Iterator[Condition]:
    """PostgreSQL unreachable: the `database` rule's probe then fails and yields nothing (so
    "unknown" never resolves), which left an outage of the source of truth without any alert."""
    yield _unreachable(check_postgres, "postgres-down", "PostgreSQL unreachable",
                       "jobs fail and retry, the relay pauses, nothing new is applied until it is back.",
                       "postgresql-unreachable")


def redis_reachable() -> Iterator[Condition]:
    """Redis unreachable (a lost primary before Sentinel promotes a replica, or no Redis at all):
    the other Redis rules cannot evaluate and yield nothing, so this one names the outage. Its
    alert is sent without Redis's dedup (each monitor replica's own cooldown) and resolved once
    Redis answers again (worker.alerts remembers it locally)."""
    yield _unreachable(check_redis, "redis-down", "Redis unreachable",
                       "no job is delivered until it is back; the outbox keeps every job in PostgreSQL "
                       "and the relay sends them again.", "redis-unreachable")


def database() -> Iterator[Condition]:
    s = probes.database_state()
    dead = s["dead_letters"]
    total = sum(dead.values())
    yield Condition(
        "dead-letters", total > 0, Severity.HIGH, "Dead letters waiting",
        f"{total} job(s) failed for good and wait for a decision ("
        + ", ".join(f"{job}: {n}" for job, n in list(dead.items())[:5]) + "). `drop-jobs dlq list`.",
        runbook="dead-letters", cooldown_s=900,
    )
    yield Condition(
        "outbox-stuck", s["outbox_oldest_age_s"] > OUTBOX_STUCK_AGE_S, Severity.HIGH, "Outbox stuck",
        f"{s['outbox_backlog']} outbox row(s) due; the oldest has waited {int(s['outbox_oldest_age_s'])} s "
        "for the relay/worker.",
        runbook="outbox-stuck", for_s=OUTBOX_STUCK_FOR_S,
    )
    reviewed = s["kyc_reviewed"]
    rate = s["kyc_approved"] / reviewed if reviewed else 1.0
    yield Condition(
        "kyc-approval-low", reviewed >= KYC_MIN_REVIEWS and rate < KYC_MIN_RATE, Severity.HIGH,
        "KYC approval rate low",
        f"{rate:.0%} of {reviewed} KYC reviews approved in the last hour (threshold 70 %).",
        runbook="kyc-approval-rate-low",
    )
    yield Condition(
        "aisp-balances-stale", s["aisp_oldest_age_s"] > AISP_STALE_S, Severity.WARNING, "AISP balances stale",
        f"Oldest cached balance among {s['aisp_accounts']} valid-consent account(s) is "
        f"{s['aisp_oldest_age_s'] / 3600:.1f} h old (threshold 6 h).",
        runbook="aisp-balance-stale",
    )


RULES: tuple[Rule, ...] = (error_spike, breakers, redis_reachable, redis_state, postgres_state, database)


class Evaluator:
    """Applies conditions: `for` durations (per replica), then Redis-deduplicated alerts."""

    def __init__(self, rules: tuple[Rule, ...] = RULES) -> None:
        self.rules = rules
        self.pending: dict[str, float] = {}

    def evaluate(self) -> dict[str, str]:
        """One pass; returns {key: "sent" | "suppressed" | "pending" | "resolved" | "ok"}."""
        outcome: dict[str, str] = {}
        for rule in self.rules:
            try:
                conditions = list(rule())
            except Exception as error:
                log.warning("alert rule %s could not evaluate: %s", rule.__name__, type(error).__name__)
                continue
            for c in conditions:
                outcome[c.key] = self._apply(c)
        return outcome

    def _apply(self, c: Condition) -> str:
        now = time.monotonic()
        if not c.firing:
            self.pending.pop(c.key, None)
            return "resolved" if resolve_alert(c.key) else "ok"
        started = self.pending.setdefault(c.key, now)
        if now - started < c.for_s:
            return "pending"
        sent = send_alert(c.severity, c.title, c.message, key=c.key, runbook=c.runbook,
                          cooldown_s=c.cooldown_s, sentry=c.sentry)
        return "sent" if sent else "suppressed"


def run_loop(stop: threading.Event, interval_s: float, evaluator: Evaluator | None = None) -> None:
    evaluator = evaluator or Evaluator()
    while not stop.is_set():
        started = time.monotonic()
        try:
            evaluator.evaluate()
        except Exception:
            log.exception("alert evaluation failed")
        stop.wait(max(0.1, interval_s - (time.monotonic() - started)))


def start(stop: threading.Event, interval_s: float) -> threading.Thread:
    thread = threading.Thread(target=run_loop, args=(stop, interval_s), name="monitor-rules", daemon=True)
    thread.start()
    return thread
