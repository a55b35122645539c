"""Dramatiq middleware for monitoring, added to the stack in worker.broker.build_broker().

- SentryJobs: Sentry's own Dramatiq middleware (a no-op until Sentry is initialised), placed
  first in the stack when the broker is built. Its `after_process_boot` starts Sentry and the
  crash alerts in each worker process: the Dramatiq CLI builds the broker on import, before any
  boot hook, so sentry-sdk's patch of `Broker.__init__` would come too late to add it.
  It also tags each job's events with the message's `request_id` and job name.
- ErrorCounter: every job error (each failed attempt) is counted in one Redis window shared by
  all workers on all machines; the monitor raises "Error spike" above 5 in 60 s.
"""

from __future__ import annotations

import logging
import uuid

import dramatiq
from dramatiq.errors import Retry
from sentry_sdk.integrations.dramatiq import SentryMiddleware

log = logging.getLogger(__name__)


class SentryJobs(SentryMiddleware):
    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        from monitoring.alerts import install_crash_alerts, set_process_kind
        from monitoring.sentry import init_sentry

        set_process_kind("worker")
        install_crash_alerts("worker")
        try:
            init_sentry("worker")
        except Exception:
            log.exception("Sentry could not start; continuing without it")

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        super().before_process_message(broker, message)
        scope = getattr(message, "_scope_manager", None)
        if scope is None:  # Sentry off
            return
        import sentry_sdk

        sentry_sdk.set_tag("request_id", message.options.get("request_id") or message.message_id)
        sentry_sdk.set_tag("job", message.actor_name)


class ErrorCounter(dramatiq.Middleware):
    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message, *,
                              result: object = None, exception: BaseException | None = None) -> None:
        if exception is None or isinstance(exception, Retry):
            return  # Retry is a job asking to run again later, not an error
        actor = broker.actors.get(message.actor_name)
        throws = message.options.get("throws") or (actor.options.get("throws") if actor else None)
        if throws and isinstance(exception, throws):
            return  # declared, expected failure
        try:
            from monitoring.probes import record_job_error

            record_job_error(message.actor_name, uuid.uuid4().hex)
        except Exception as error:
            log.warning("could not count job error for the error-spike alert: %s", type(error).__name__)
