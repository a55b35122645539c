"""Actors for the crash tests, loaded by real `dramatiq` worker processes."""

import os
import signal
import time

from db.pool import transaction
from jobs.registry import registry
from worker.context import mark_outbox_done


@registry.job("test.slow_effect", queue="crash")
def slow_effect(n: int, seconds: float = 0.0) -> None:
    time.sleep(seconds)
    with transaction() as conn:
        first = conn.execute(
            "INSERT INTO processed_events (event_id, consumer_group) VALUES (%s, 'crash-test') "
            "ON CONFLICT DO NOTHING RETURNING event_id",
            (f"slow-{n}",),
        ).fetchone()
        if first:
            conn.execute(
                "INSERT INTO audit_log (action, details) VALUES ('test.effect', jsonb_build_object('n', %s::int))", (n,)
            )
        mark_outbox_done(conn)


@registry.job("test.poison", queue="crash")
def poison() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what a segfault or the OOM killer does
