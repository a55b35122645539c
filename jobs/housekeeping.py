"""Housekeeping: prune what has outlived its purpose, so the hot tables stay small."""

from __future__ import annotations

import logging
from datetime import timedelta

import dramatiq

from db.pool import transaction

log = logging.getLogger(__name__)

# Sumsub retries a webhook for 7 h 42 min; a month of dedup records is far beyond any redelivery.
# The outbox keeps done rows a week: their idempotency keys stop a repeated enqueue meanwhile, and
# each job's own dedup (processed_events, conditional updates) covers anything later.
DEDUP_WINDOW = timedelta(days=30)
OUTBOX_RETENTION = timedelta(days=7)
SCHEDULER_HISTORY = timedelta(days=30)
# Replayed dead letters are history after a month; open ones wait for on-call for 90 days (the
# outbox row of an open one is kept as long, since a replay reopens it).
DEAD_LETTER_RETENTION = timedelta(days=30)
OPEN_DEAD_LETTER_RETENTION = timedelta(days=90)


def prune() -> dict[str, int]:
    """Delete what has outlived its purpose; return the counts per table."""
    statements = {
        "processed_events": ("DELETE FROM processed_events WHERE processed_at < now() - %s", DEDUP_WINDOW),
        "job_outbox": ("DELETE FROM job_outbox WHERE done_at < now() - %s", OUTBOX_RETENTION),
        "job_outbox_failed": (
            "DELETE FROM job_outbox WHERE done_at IS NULL AND error IS NOT NULL AND created_at < now() - %s",
            OPEN_DEAD_LETTER_RETENTION,
        ),
        "dead_letters": ("DELETE FROM dead_letters WHERE replayed_at < now() - %s", DEAD_LETTER_RETENTION),
        "dead_letters_open": (
            "DELETE FROM dead_letters WHERE replayed_at IS NULL AND failed_at < now() - %s",
            OPEN_DEAD_LETTER_RETENTION,
        ),
        "scheduler_fires": ("DELETE FROM scheduler_fires WHERE fired_at < now() - %s", SCHEDULER_HISTORY),
    }
    with transaction() as conn:
        return {name: conn.execute(sql, (age,)).rowcount for name, (sql, age) in statements.items()}


@dramatiq.actor(actor_name="housekeeping.prune", queue_name="maintenance", max_retries=3)
def prune_job(slot: str | None = None) -> None:
    counts = prune()
    log.info("housekeeping pruned %s", counts)
