"""System-wide gauges computed by the monitor at scrape time (scrape target: the monitor).

Workers export their own job metrics (Dramatiq's Prometheus middleware, port 9191) and the
scheduler its replica gauges (port 9192); this registry holds what only a global view can say:
queues, dead letters, outbox, breakers (from Redis), KYC approval rate, AISP staleness,
schedule fires (from PostgreSQL), workers alive. See docs/monitoring.md for every name.

Each probe is guarded on its own: a failing dependency drops its series and sets
`drop_monitor_probe_up{probe="…"} 0` instead of failing the whole scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import jobs
from worker import probes
from worker.metrics import REGISTRY

log = logging.getLogger(__name__)

def _gauge(name: str, doc: str, value: float | None = None, labels: list[str] | None = None) -> GaugeMetricFamily:
    if labels is not None:
        return GaugeMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, value=value)


class SystemCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "drop_monitor_probe_up", "1 if the monitor's probe succeeded at this scrape", labels=["probe"]
        )
        for probe, fn in (("redis", self._redis), ("breakers", self._breakers), ("postgres", self._postgres)):
            started = time.monotonic()
            try:
                metrics = list(fn())
            except Exception as error:
                log.warning("metrics probe %s failed: %s", probe, type(error).__name__)
                up.add_metric([probe], 0.0)
                continue
            up.add_metric([probe], 1.0)
            log.debug("probe %s took %.3f s", probe, time.monotonic() - started)
            yield from metrics
        yield up

    def _redis(self) -> Iterator[Metric]:
        stats = probes.queue_stats(probes.queues(jobs.registry.queues()))
        ages = probes.queue_oldest_age([q["queue"] for q in stats])
        depth = _gauge("drop_queue_depth", "Messages ready in a queue", labels=["queue"])
        delayed = _gauge("drop_queue_delayed", "Delayed (retry/backoff) messages of a queue", labels=["queue"])
        dead = _gauge("drop_queue_dead", "Messages in Dramatiq's Redis dead-letter set of a queue", labels=["queue"])
        oldest = _gauge("drop_queue_oldest_message_age_seconds", "Age of the oldest ready message", labels=["queue"])
        for q in stats:
            depth.add_metric([q["queue"]], q["ready"])
            delayed.add_metric([q["queue"]], q["delayed"])
            dead.add_metric([q["queue"]], q["dead"])
            oldest.add_metric([q["queue"]], ages.get(q["queue"], 0.0))
        yield from (depth, delayed, dead, oldest)
        yield _gauge(
            "drop_workers_alive", "Worker consumers with a heartbeat in the last 30 s", value=probes.workers_alive()
        )
        # `actor_name`, as Dramatiq's own metrics: a `job` label would be renamed `exported_job` on
        # scrape (Prometheus's target label), and every panel grouping by it would see one series.
        errors = _gauge("drop_job_errors_last_minute", "Job errors in the last 60 s across all workers",
                        labels=["actor_name"])
        for job, n in sorted(probes.job_errors().items()):
            errors.add_metric([job], n)
        yield errors
        leader = probes.scheduler_leader()
        yield _gauge(
            "drop_scheduler_leader_up",
            "1 if a scheduler leader heartbeat is fresh (< 30 s)",
            value=0.0 if leader is None else 1.0,
        )
        if leader is not None:
            yield _gauge(
                "drop_scheduler_leader_heartbeat_timestamp_seconds",
                "Unix time of the scheduler leader's last heartbeat",
                value=float(leader["heartbeat"]),
            )

    def _breakers(self) -> Iterator[Metric]:
        open_ = _gauge("drop_circuit_breaker_open", "1 while the breaker is open or half-open", labels=["breaker"])
        opened = _gauge(
            "drop_circuit_breaker_opened_timestamp_seconds",
            "Unix time the breaker last opened (only while not closed)",
            labels=["breaker"],
        )
        pisp = 0.0
        for name, status in sorted(probes.breaker_statuses().items()):
            value = 1.0 if status.is_open else 0.0
            open_.add_metric([name], value)
            if status.is_open and status.opened_at is not None:
                opened.add_metric([name], status.opened_at.timestamp())
            if name == "neonomics_pisp":
                pisp = value
        yield open_
        yield opened
        # Seed 000 §7.1 name, kept verbatim.
        yield _gauge("pisp_circuit_open", "1 while the Neonomics PISP breaker is open (docs/monitoring.md)", value=pisp)

    def _postgres(self) -> Iterator[Metric]:
        s = probes.database_state()
        yield _gauge("drop_dead_letters", "Dead letters not yet replayed", value=sum(s["dead_letters"].values()))
        by_job = _gauge("drop_dead_letters_by_job", "Dead letters not yet replayed, per job", labels=["actor_name"])
        for job, n in sorted(s["dead_letters"].items()):
            by_job.add_metric([job], n)
        yield by_job
        yield _gauge("drop_outbox_backlog", "Outbox rows due and not done", value=s["outbox_backlog"])
        yield _gauge(
            "drop_outbox_oldest_age_seconds", "Age of the oldest due outbox row", value=s["outbox_oldest_age_s"]
        )
        yield _gauge(
            "drop_kyc_reviews_last_hour",
            "KYC review decisions (approved/rejected/retry) in the last hour",
            value=s["kyc_reviewed"],
        )
        rate = _gauge(
            "kyc_approval_rate",
            "Approved / reviewed KYC decisions over the last hour, 0–1 (absent when there were none)",
            labels=[],
        )
        if s["kyc_reviewed"]:
            rate.add_metric([], s["kyc_approved"] / s["kyc_reviewed"])
        yield rate
        yield _gauge(
            "drop_aisp_balance_staleness_seconds",
            "Age of the oldest cached balance among accounts with a valid consent",
            value=s["aisp_oldest_age_s"],
        )
        yield _gauge(
            "drop_aisp_accounts_never_synced",
            "Valid-consent accounts without any balance yet",
            value=s["aisp_never_synced"],
        )
        fires = _gauge(
            "drop_schedule_last_fire_timestamp_seconds",
            "Slot time of the last fired run per schedule (any scheduler replica)",
            labels=["schedule"],
        )
        for job, ts in sorted(s["schedule_last_fire"].items()):
            fires.add_metric([job], ts)
        yield fires
        missed = _gauge(
            "drop_schedule_missed_slots", "Slots recorded as missed (outage), per schedule", labels=["schedule"]
        )
        for job, n in sorted(s["schedule_missed"].items()):
            missed.add_metric([job], n)
        yield missed


REGISTRY.register(SystemCollector())
