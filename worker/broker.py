"""The Dramatiq broker and its middleware stack, chosen explicitly.

Dramatiq 2.x adds only a default stack (and no Prometheus); we name every middleware so that
what runs in production is what is read here:

- AgeLimit / TimeLimit: a job older than its actor's `max_age` is dropped to the dead letters;
  a job running longer than `time_limit` (default 120 s) is interrupted.
- ShutdownNotifications: on SIGTERM running jobs finish (notify_shutdown off: an interrupted job
  would have read the provider without committing); actors may opt in to interruption.
- Callbacks, Pipelines: Dramatiq's composition features.
- RetryPolicy: Dramatiq's Retries with the policy of worker.retry: transient errors only, 1 s/2 s/4 s + jitter, 3 times.
- AsyncIO: `async def` actors share one event loop per worker process (I/O-bound jobs).
- CurrentMessage: jobs read their outbox id and request id from the message.
- Prometheus: job counts and durations, served by the worker on DROP_WORKER_METRICS_PORT.
- worker.middleware: dead letters recorded in PostgreSQL, outbox rows marked done, request ids,
  and the outbox relay running as a fork beside each worker pool.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import dramatiq.broker as broker_module
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    AsyncIO,
    Callbacks,
    CurrentMessage,
    MiddlewareError,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)

from worker.logs import install_record_scrubber
from worker.middleware import (
    ErrorCounter,
    OutboxBookkeeping,
    OutboxRelayFork,
    RequestContext,
    RetryPolicy,
    SentryJobs,
)
from worker.redelivery import CrashGuard
from worker.redis_client import CLIENT_OPTIONS, redis_from_url
from worker.settings import Settings, get_settings

DEFAULT_TIME_LIMIT_MS = 120_000
# A worker that vanished (SIGKILL) is declared dead after this long; its unacked messages are
# then requeued by the next maintenance pass (worker.redelivery, every 5 s).


class DropRedisBroker(RedisBroker):
    """Dramatiq's RedisBroker that calls, per signal, only the middleware that handle it.

    `Broker.emit_before/after` call every middleware's hook, most of them the base class's no-op
    (of 15 middleware, none handles `ack`, 2 `enqueue`, 8 `before_process_message`): ~0.5 µs each,
    several signals per message. The lists are rebuilt whenever the middleware list changes
    (Dramatiq's Worker appends its own; tests remove it again), checked by a snapshot compare.
    Order and error handling are Broker's own."""

    def _handlers(self, name: str) -> list[Any]:
        cache: dict[str, list[Any]] = self.__dict__.setdefault("_drop_hooks", {})
        snapshot = tuple(self.middleware)
        if self.__dict__.get("_drop_hooks_of") != snapshot:
            cache.clear()
            self.__dict__["_drop_hooks_of"] = snapshot
        handlers = cache.get(name)
        if handlers is None:
            base = getattr(dramatiq.Middleware, name, None)
            order = snapshot if name.startswith("before_") else tuple(reversed(snapshot))
            handlers = cache[name] = [m for m in order if base is None or getattr(type(m), name, None) is not base]
        return handlers

    def _emit(self, name: str, passes: tuple[type[BaseException], ...], args: Any, kwargs: Any) -> None:
        for middleware in self._handlers(name):
            try:
                getattr(middleware, name)(self, *args, **kwargs)
            except passes:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", name, middleware, exc_info=True)

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        self._emit("before_" + signal, (MiddlewareError,), args, kwargs)  # e.g. SkipMessage stops the run

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        self._emit("after_" + signal, (), args, kwargs)


def _prometheus_middleware(settings: Settings) -> dramatiq.Middleware:
    # dramatiq.middleware.prometheus reads these at import time.
    prom_dir = (settings.data_dir / "prometheus-worker").resolve()
    prom_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("dramatiq_prom_db", str(prom_dir))
    os.environ.setdefault("dramatiq_prom_host", "127.0.0.1")
    os.environ.setdefault("dramatiq_prom_port", str(settings.worker_metrics_port))
    from dramatiq.middleware.prometheus import Prometheus  # reads the variables above on import


    return Prometheus()


def build_broker(settings: Settings | None = None, *, metrics: bool = True) -> DropRedisBroker:
    """A Redis broker with drop-worker's middleware stack (not yet made the global broker)."""

    install_record_scrubber()  # every process that has a broker logs through the PII scrubber

    settings = settings or get_settings()
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set (run through `drop-jobs` or `make run`)")
    middleware: list[dramatiq.Middleware] = [
        SentryJobs(),  # first: its scope wraps every other middleware's work (worker.middleware)
        AgeLimit(),
        CrashGuard(),  # a message that keeps killing its worker ends in the dead letters
        TimeLimit(time_limit=DEFAULT_TIME_LIMIT_MS),
        # On SIGTERM, running jobs finish (within the pool's 30 s shutdown timeout) rather than being
        # interrupted after their provider call and before their commit; unstarted ones are requeued.
        ShutdownNotifications(notify_shutdown=False),
        Callbacks(),
        Pipelines(),
        # Retries, the reschedule accounting and the dead letters, in one after-hook (its order
        # inside, not this list's, decides); OutboxBookkeeping below runs before it.
        RetryPolicy(),
        AsyncIO(),
        CurrentMessage(),
        RequestContext(),
        OutboxBookkeeping(),
        ErrorCounter(),  # job errors → shared Redis window → "Error spike" alert
    ]
    if metrics:
        middleware.append(_prometheus_middleware(settings))
        middleware.append(OutboxRelayFork())
    return DropRedisBroker(
        # the broker's client comes from the same place as every other (Sentinel URLs included)
        client=redis_from_url(settings.redis_url, **CLIENT_OPTIONS),
        namespace=f"{settings.redis_namespace}-dramatiq",
        middleware=middleware,
        heartbeat_timeout=settings.worker_heartbeat_timeout_ms,
        # Dramatiq's own maintenance (on a random 0.1 % of broker calls) would requeue a dead
        # worker's messages without the redelivery mark CrashGuard counts; the relay's
        # maintenance pass (worker.redelivery, every 5 s) is the only one.
        maintenance_chance=0,
    )


def setup_broker() -> dramatiq.Broker:
    """Install the broker as Dramatiq's global one (idempotent); jobs.app binds every job to it."""
    current = dramatiq.get_broker() if _has_global_broker() else None
    if isinstance(current, RedisBroker) and getattr(current, "_drop_worker", False):
        return current
    broker = build_broker()
    broker._drop_worker = True  # type: ignore[attr-defined]
    dramatiq.set_broker(broker)
    return broker


def _has_global_broker() -> bool:
    return broker_module.global_broker is not None
