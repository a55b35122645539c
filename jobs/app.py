"""The composition root: the one module that builds the broker and binds every job to it.

`python -m dramatiq jobs.app` (worker.pool) loads it in every worker process and in the relay
fork; nothing else builds a broker on import. Everything else needs no broker: callers enqueue
through the outbox (`jobs.enqueue`), the monitor reads Redis through worker.dramatiq_redis.
"""

from __future__ import annotations

from jobs import registry
from worker.broker import setup_broker

broker = setup_broker()
actors = registry.declare_on(broker)
