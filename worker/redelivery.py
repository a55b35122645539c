"""Bounded redelivery after a worker dies, and a cap on messages that keep killing workers.

Dramatiq's Redis broker moves a dead worker's unacked messages back to their queue only during
"maintenance", which runs on a random 0.1 % of broker calls, after the worker's heartbeat is
older than `heartbeat_timeout`. On a quiet system that can take a very long time.
`requeue_dead_workers()` runs the broker's own maintenance on every queue on a timer (the outbox
relay calls it every few seconds), so redelivery after a SIGKILL takes at most
heartbeat_timeout + MAINTENANCE_INTERVAL_S.

A message whose processing kills the worker (segfault, OOM kill) would be redelivered forever
(Dramatiq issue #213). `CrashGuard` counts only redeliveries, so a first delivery — nearly every
message — costs it nothing: the maintenance pass that takes a dead worker's unacked messages back
marks each one in its own data in Redis (`dramatiq_redis.REDELIVERIES`). A marked message then
counts its processing starts in a Redis counter (raised before, cleared after, whatever the
outcome, so it only grows across crashes); crashes = the one the mark records + the starts since
that never came back. Past MAX_CRASHES the message is dead-lettered with that reason. A message
that was only prefetched (not yet running) by the worker that died is marked too: it can be
counted one crash it did not cause, never more, since its later starts are counted exactly.
"""

from __future__ import annotations

import logging
import time

import dramatiq
from dramatiq.middleware import SkipMessage

from worker import dramatiq_redis
from worker.redis_client import get_redis, key

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 5.0
MAX_CRASHES = 3


def requeue_dead_workers(broker: dramatiq.Broker) -> None:
    """Run Dramatiq's maintenance (requeue dead workers' messages, expire old dead letters)."""
    dramatiq_redis.run_maintenance(broker)


class MaintenanceTimer:
    """Calls requeue_dead_workers at most every MAINTENANCE_INTERVAL_S (from a loop)."""

    def __init__(self, broker: dramatiq.Broker, interval: float = MAINTENANCE_INTERVAL_S) -> None:
        self.broker, self.interval, self.last = broker, interval, 0.0

    def tick(self) -> None:
        if time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            try:
                requeue_dead_workers(self.broker)
            except Exception:  # the next tick tries again
                log.exception("broker maintenance pass failed")


# INCR + EXPIRE as one atomic command (only for redelivered messages: see the module text).
_COUNT_DELIVERY = """
local n = redis.call('incr', KEYS[1])
redis.call('expire', KEYS[1], ARGV[1])
return n
"""


def redelivered(message: dramatiq.Message) -> bool:
    return bool(message.options.get(dramatiq_redis.REDELIVERIES))


class CrashGuard(dramatiq.Middleware):
    TTL_S = 24 * 3600

    def __init__(self) -> None:
        self._count = None  # registered on first use; every call names the process's current client

    def _key(self, message: dramatiq.Message) -> str:
        return key("deliveries", message.message_id)

    def _count_delivery(self, client, name: str) -> int:
        count = self._count
        if count is None:
            count = self._count = client.register_script(_COUNT_DELIVERY)
        # EVALSHA on this client (redis-py loads the script on NOSCRIPT, e.g. after a Redis restart).
        return int(count(keys=[name], args=[self.TTL_S], client=client))

    def before_process_message(self, broker, message):
        if not redelivered(message):
            return  # a first delivery: no Redis round trip
        client = get_redis()
        # The mark is one crash; every counted start before this one did not come back either.
        crashes = self._count_delivery(client, self._key(message))
        if crashes >= MAX_CRASHES:
            client.delete(self._key(message))
            message.options["dead_letter_reason"] = (
                f"killed its worker {crashes} times (SIGKILL/OOM/segfault); not run again"
            )
            message.fail()
            raise SkipMessage(message.options["dead_letter_reason"])

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if redelivered(message):
            get_redis().delete(self._key(message))

    def after_skip_message(self, broker, message):
        if "dead_letter_reason" not in message.options:
            self.after_process_message(broker, message)
