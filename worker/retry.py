"""The retry policy of docs/providers.md, in one place.

Retry only transient failures (provider 500/502/503, timeouts, connection errors, a lost
database or Redis connection): at most 3 retries, backoff 1 s, 2 s, 4 s with jitter.
Everything else (4xx, bad payloads, programming errors) fails at once and goes to the
dead-letter queue with its reason. worker.middleware.RetryPolicy (Dramatiq's Retries) applies
it to every job; provider clients raise the typed errors it reads.
"""

from __future__ import annotations

import random

import dramatiq
import psycopg
import redis
from dramatiq.middleware import Shutdown

MAX_RETRIES = 3
# A job that asks to run again later (returns `worker.outcomes.RunLater`, e.g. while a breaker is
# open) is rescheduled without using up the 3 transient retries, up to this many times.
MAX_RESCHEDULES = 60
FIRST_BACKOFF_MS = 1_000
MAX_BACKOFF_MS = 8_000
ATTEMPT_TIMEOUT_S = 30.0


class TransientError(Exception):
    """Raise (or subclass) for a failure worth retrying: the next attempt may succeed."""


class PermanentError(Exception):
    """Raise (or subclass) for a failure no retry will fix; the message is dead-lettered."""


TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TransientError,
    TimeoutError,
    ConnectionError,
    psycopg.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_TYPES) and not isinstance(exc, PermanentError)


def interrupted_by_shutdown(exc: BaseException) -> bool:
    """`Shutdown`, or an error raised while handling it (Dramatiq's AsyncIO bridge raises
    RuntimeError("Timed out while waiting for coroutine.") from it when a cancelled coroutine
    takes over a second to unwind)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, Shutdown):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def should_retry(retries_so_far: int, exc: BaseException) -> bool:
    """Dramatiq `retry_when`: retry transient errors, at most MAX_RETRIES times; honour an
    explicit `dramatiq.Retry` (a reschedule with its own delay) up to MAX_RESCHEDULES times.
    A job interrupted by a graceful shutdown (ShutdownNotifications raises `Shutdown` in it on
    SIGTERM) rolled back and goes back to the queue: it did not fail."""
    if isinstance(exc, dramatiq.Retry) or interrupted_by_shutdown(exc):
        return retries_so_far < MAX_RESCHEDULES
    return retries_so_far < MAX_RETRIES and is_transient(exc)


def backoff_ms(retries_so_far: int, *, rng: random.Random | None = None) -> int:
    """1 s, 2 s, 4 s … with up to +50 % jitter (for callers that wait in-process)."""
    base = FIRST_BACKOFF_MS * (2 ** min(retries_so_far, 10))
    jitter = (rng or random).uniform(0, 0.5)
    return min(int(base * (1 + jitter)), MAX_BACKOFF_MS)
