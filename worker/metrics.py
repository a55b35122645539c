"""The Prometheus registry the monitor serves, and the alert pipeline's own counters.

The monitor (monitoring.server) serves REGISTRY; its scrape-time gauges are registered on it by
monitoring.metrics. The alert counters live here because every process sends alerts
(worker.alerts, worker.slack).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry()

# The alert pipeline's own health, for the monitor process (alerts.py, slack.py).
ALERTS_SENT = Counter(
    "drop_alerts_sent_total", "Alerts raised (sent to Slack and the log)", ["severity"], registry=REGISTRY
)
ALERTS_SUPPRESSED = Counter("drop_alerts_suppressed_total", "Alerts suppressed by dedup/cooldown", registry=REGISTRY)
ALERT_DELIVERY_FAILURES = Counter(
    "drop_alert_delivery_failures_total", "Slack deliveries given up (alert kept in the log)", registry=REGISTRY
)
