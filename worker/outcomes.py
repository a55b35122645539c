"""What a job body may return besides "done", turned into Dramatiq behaviour in one place.

Like Oban's `{:snooze, seconds}`: a job that must wait (a breaker is open, a row is busy)
returns `RunLater(delay_ms, reason)` instead of raising. `as_actor_fn` (applied by
worker.registry when jobs are bound to the broker) turns it into Dramatiq's `Retry`, and the
`RetryPolicy` middleware (worker.middleware) keeps it from using up the transient retries.
Everything else a job returns means done; an exception means failed (worker.retry decides
whether a failure is retried or dead-lettered).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dramatiq


@dataclass(frozen=True)
class RunLater:
    """Run this job again after `delay_ms`, without using one of its transient retries."""

    delay_ms: int
    reason: str = "run later"


def to_dramatiq(result: Any) -> Any:
    if isinstance(result, RunLater):
        raise dramatiq.Retry(message=result.reason, delay=max(0, int(result.delay_ms)))
    return result


def as_actor_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as Dramatiq runs it: its outcome values become Dramatiq behaviour."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            return to_dramatiq(await fn(*args, **kwargs))

        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return to_dramatiq(fn(*args, **kwargs))

    return run
