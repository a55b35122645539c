"""Housekeeping: prune what has outlived its purpose, so the hot tables stay small."""

from __future__ import annotations

import logging
from datetime import timedelta

import dramatiq

from db.pool import transaction

log = logging.getLogger(__name__)

# Sumsub retries a webhook for 7 h 42 min; a month of dedup records is far beyond any redelivery.
DEDUP_WINDOW = timedelta(days=30)
OUTBOX_RETENTION = timedelta(days=7)
DEAD_LETTER_RETENTION = timedelta(days=30)


def prune() -> dict[str, int]:
    counts: dict[str, int] = {}
    with transaction() as conn:
        counts["processed_events"] = conn.execute(
            "DELETE FROM processed_events WHERE processed_at < now() - %s", (DEDUP_WINDOW,)
        ).rowcount
        counts["job_outbox"] = conn.execute(
            "DELETE FROM job_outbox WHERE done_at < now() - %s", (OUTBOX_RETENTION,)
        ).rowcount
        # Only dead letters someone already dealt with (replayed); open ones wait for on-call.
        counts["dead_letters"] = conn.execute(
            "DELETE FROM dead_letters WHERE replayed_at < now() - %s", (DEAD_LETTER_RETENTION,)
        ).rowcount
    return counts


@dramatiq.actor(actor_name="housekeeping.prune", queue_name="maintenance", max_retries=3)
def prune_job(slot: str | None = None) -> None:
    counts = prune()
    log.info("housekeeping pruned %s", counts)
