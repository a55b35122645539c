"""System-wide gauges computed by the monitor at scrape time (one scrape target: the monitor)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class SystemCollector(Collector):
    def collect(self):
        import jobs
        from db.pool import transaction
        from monitoring.probes import breaker_states, queue_stats, workers_alive

        depth = GaugeMetricFamily("drop_queue_depth", "Messages ready in a queue", labels=["queue"])
        delayed = GaugeMetricFamily("drop_queue_delayed", "Delayed messages in a queue", labels=["queue"])
        for q in queue_stats(jobs.broker):
            depth.add_metric([q["queue"]], q["ready"])
            delayed.add_metric([q["queue"]], q["delayed"])
        yield depth
        yield delayed
        yield GaugeMetricFamily("drop_workers_alive", "Worker consumers with a recent heartbeat",
                                value=workers_alive(jobs.broker))
        with transaction() as conn:
            dl = conn.execute("SELECT count(*) AS n FROM dead_letters WHERE replayed_at IS NULL").fetchone()["n"]
            ob = conn.execute(
                """SELECT count(*) AS backlog,
                          COALESCE(extract(epoch FROM now() - min(available_at)), 0) AS oldest
                     FROM job_outbox
                    WHERE done_at IS NULL AND error IS NULL AND available_at <= now()"""
            ).fetchone()
        yield GaugeMetricFamily("drop_dead_letters", "Open dead letters", value=dl)
        yield GaugeMetricFamily("drop_outbox_backlog", "Outbox rows due and not done", value=ob["backlog"])
        yield GaugeMetricFamily("drop_outbox_oldest_age_seconds", "Age of the oldest due outbox row",
                                value=float(ob["oldest"]))
        open_ = GaugeMetricFamily("drop_circuit_breaker_open", "1 if the breaker is open", labels=["breaker"])
        for name, state in breaker_states().items():
            open_.add_metric([name], 1.0 if state == "open" else 0.0)
        yield open_


REGISTRY = CollectorRegistry()
REGISTRY.register(SystemCollector())
