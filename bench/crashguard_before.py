"""Bench-only shim: CrashGuard and get_redis() as they were before the point-8 change (a
MULTI/INCR/EXPIRE/EXEC pipeline per message, a lock on every get_redis()), so that
`python -m bench kyc` measures before and after within one run:

    python -m dramatiq jobs.app bench.crashguard_before --queues kyc
"""

from __future__ import annotations

import os

import jobs.app  # noqa: F401  (the composition root: drop-worker's broker and jobs)
from worker import redis_client
from worker.redelivery import MAX_CRASHES, CrashGuard


def _get_redis_locked():  # type: ignore[no-untyped-def]
    import redis

    from worker.settings import get_settings

    with redis_client._lock:
        if redis_client._client is None or redis_client._client_pid != os.getpid():
            settings = get_settings()
            redis_client._client = redis.Redis.from_url(settings.redis_url, socket_timeout=5,
                                                        socket_connect_timeout=3, health_check_interval=30)
            redis_client._client_pid = os.getpid()
        return redis_client._client


def _before_with_multi(self, broker, message):  # type: ignore[no-untyped-def]
    from dramatiq.middleware import SkipMessage

    client = redis_client.get_redis()
    pipe = client.pipeline()
    pipe.incr(self._key(message))
    pipe.expire(self._key(message), self.TTL_S)
    started, _ = pipe.execute()
    crashes = int(started) - 1
    if crashes >= MAX_CRASHES:
        client.delete(self._key(message))
        message.options["dead_letter_reason"] = f"killed its worker {crashes} times (SIGKILL/OOM/segfault)"
        message.fail()
        raise SkipMessage(message.options["dead_letter_reason"])


redis_client.get_redis = _get_redis_locked
CrashGuard.before_process_message = _before_with_multi  # type: ignore[method-assign]
