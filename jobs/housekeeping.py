"""Housekeeping: prune what has outlived its purpose, so the hot tables stay small."""

from __future__ import annotations

import logging
from datetime import timedelta

from db import outbox
from db.pool import transaction
from jobs.registry import registry

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
    with transaction() as conn:
        counts = {
            "processed_events": conn.execute(
                "DELETE FROM processed_events WHERE processed_at < now() - %s", (DEDUP_WINDOW,)).rowcount,
            **outbox.prune(conn, done_for=OUTBOX_RETENTION, failed_for=OPEN_DEAD_LETTER_RETENTION,
                           replayed_for=DEAD_LETTER_RETENTION, open_for=OPEN_DEAD_LETTER_RETENTION),
            "scheduler_fires": conn.execute(
                "DELETE FROM scheduler_fires WHERE fired_at < now() - %s", (SCHEDULER_HISTORY,)).rowcount,
        }
    return counts


@registry.job("housekeeping.prune", queue="maintenance", max_retries=3)
def prune_job(slot: str | None = None) -> None:
    counts = prune()
    log.info("housekeeping pruned %s", counts)
