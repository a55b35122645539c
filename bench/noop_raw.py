"""The limit: a raw Dramatiq no-op actor on a plain RedisBroker (Dramatiq's default middleware),
same Redis server, namespace from BENCH_NAMESPACE. Run with the same `dramatiq` CLI shape.

    python -m dramatiq bench.noop_raw --processes 2 --threads 8
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ["REDIS_URL"], namespace=f"{os.environ.get('BENCH_NAMESPACE', 'bench')}-raw")
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench.noop", queue_name="bench")
def noop(i: int = 0) -> None:
    """Does nothing: what is left is Dramatiq's own cost per message."""
