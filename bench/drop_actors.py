"""A no-op actor on drop-worker's own broker (full middleware stack), loaded beside `jobs`:

    python -m dramatiq jobs.app bench.drop_actors --queues bench

The gap between it and bench.noop_raw is the cost of our middleware per message.
"""

from __future__ import annotations

import dramatiq

import jobs.app  # noqa: F401  (the composition root: drop-worker's broker and jobs)


@dramatiq.actor(actor_name="bench.drop_noop", queue_name="bench")
def drop_noop(i: int = 0) -> None:
    """Does nothing, through drop-worker's middleware stack."""
