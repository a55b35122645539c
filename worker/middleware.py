"""drop-worker's own Dramatiq middleware.

- RequestContext: every message carries a `request_id` (propagated to provider calls as
  `X-Request-ID`); kept in a contextvar while the job runs.
- RetryPolicy: Dramatiq's Retries with worker.retry's policy; a `RunLater` does not use up
  the transient retries; a message that failed for good (or that AgeLimit dropped) is recorded
  in PostgreSQL `dead_letters` with its reason, and its outbox row is closed with that reason
  so the relay never sends it again. `drop-jobs dlq` works on this table.
- OutboxBookkeeping: after a successful run, the message's outbox row is marked done (a job
  that wants the mark inside its own transaction calls `worker.context.mark_outbox_done(conn)`).
- OutboxRelayFork: runs the outbox relay as a fork beside each worker pool.
- SentryJobs: Sentry's own Dramatiq middleware (a no-op until Sentry is initialised), placed
  first in the stack. Its `after_process_boot` starts Sentry and the crash alerts in each worker
  process: the broker is built before any boot hook, so sentry-sdk's patch of `Broker.__init__`
  would come too late to add it. It also tags each job's events with its `request_id` and job.
- ErrorCounter: every job error (each failed attempt) is counted in one Redis window shared by
  all workers on all machines; the monitor raises "Error spike" above 5 in 60 s.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from typing import Any

import dramatiq
import sentry_sdk
from dramatiq.broker import MessageProxy
from dramatiq.errors import Retry
from dramatiq.middleware import Retries
from sentry_sdk.integrations.dramatiq import SentryMiddleware

from db import outbox
from db.pool import transaction
from worker import context
from worker.alerts import install_crash_alerts, set_process_kind
from worker.context import request_id_var
from worker.pii import scrub_text
from worker.probes import record_job_error
from worker.relay import CHUNK_OPTION, run_relay_fork
from worker.retry import FIRST_BACKOFF_MS, MAX_BACKOFF_MS, MAX_RESCHEDULES, MAX_RETRIES, should_retry
from worker.sentry import TRACES_SHARE_OPTION, init_sentry

log = logging.getLogger(__name__)



def failure_reason(exc: BaseException | None) -> str:
    """A short, PII-free reason: the exception type and its scrubbed message, cut to 500 characters.

    Our errors name fields, never values; the scrubber is here for everyone else's exceptions."""
    if exc is None:
        return "unknown"
    return scrub_text(f"{type(exc).__name__}: {exc}")[:500]


class RequestContext(dramatiq.Middleware):
    def __init__(self) -> None:
        self._tokens: dict[str, contextvars.Token] = {}

    def before_enqueue(self, broker, message, delay):
        message.options.setdefault("request_id", str(uuid.uuid4()))

    def before_process_message(self, broker, message):
        rid = message.options.get("request_id") or message.message_id
        self._tokens[message.message_id] = request_id_var.set(rid)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        token = self._tokens.pop(message.message_id, None)
        if token is not None:
            try:
                request_id_var.reset(token)
            except ValueError:  # set in another context: just clear it
                request_id_var.set(None)

    def after_skip_message(self, broker, message):
        self.after_process_message(broker, message)


class RetryPolicy(Retries):
    """Dramatiq's Retries with drop-worker's policy (worker.retry), owning everything that
    depends on its verdict, in one hook and in this order:

    1. A job that returned `RunLater` (Dramatiq's `Retry`, worker.outcomes) does not use up its
       transient retries: it is counted in `reschedules`, up to MAX_RESCHEDULES.
    2. Dramatiq's own decision: retry with backoff (1 s, 2 s, 4 s + jitter) or fail for good.
    3. A message that failed for good is recorded in `dead_letters` with its reason, and its
       outbox row is closed; so is one AgeLimit skipped as too old.
    """

    def __init__(self) -> None:
        super().__init__(max_retries=MAX_RETRIES, min_backoff=FIRST_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS,
                         retry_when=should_retry)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if exception is None:
            return
        if isinstance(exception, dramatiq.Retry):
            reschedules = message.options.get("reschedules", 0) + 1
            message.options["reschedules"] = reschedules
            # Retries asks should_retry with options["retries"], then adds one before it
            # re-enqueues: take one off so the transient count is unchanged, or, past
            # MAX_RESCHEDULES, hand it that limit so the policy ends the reschedules.
            if reschedules <= MAX_RESCHEDULES:
                message.options["retries"] = message.options.get("retries", 0) - 1
            else:
                message.options["retries"] = MAX_RESCHEDULES
        super().after_process_message(broker, message, result=result, exception=exception)
        if message.failed:
            record_dead_letter(message, exception)

    def after_skip_message(self, broker, message):
        if message.failed:
            reason = message.options.get("dead_letter_reason") or "skipped: message older than its max_age"
            record_dead_letter(message, None, reason=reason)


def record_dead_letter(message: dramatiq.Message, exc: BaseException | None, *, reason: str | None = None) -> None:
    reason = scrub_text(reason)[:500] if reason else failure_reason(exc)
    body = message.asdict()
    body["options"] = {k: v for k, v in body["options"].items() if k not in ("traceback", "dead_letter_reason")}
    try:
        with transaction() as conn:
            outbox.record_dead_letter(
                conn,
                message_id=message.message_id,
                job=message.actor_name,
                queue=message.queue_name,
                message=body,
                outbox_id=message.options.get("outbox_id"),
                reason=reason,
                retries=message.options.get("retries", 0),
            )
        log.warning("job %s dead-lettered (message %s): %s", message.actor_name, message.message_id, reason)
    except Exception:
        # The message is still in Dramatiq's own dead-letter queue in Redis.
        log.exception("could not record dead letter %s in PostgreSQL", message.message_id)


def dead_letter_job(job: str, queue: str, kwargs: dict[str, Any], exc: BaseException, *,
                    outbox_id: int | None = None) -> None:
    """A dead letter for a job that never had a message of its own (one account of an AISP batch,
    one poll of a chunk): replayable like any other, as that job with these arguments; its outbox
    row, if it has one, is closed with the reason exactly as for a message of its own."""
    options = {} if outbox_id is None else {"outbox_id": outbox_id}
    message: dramatiq.Message[Any] = dramatiq.Message(queue_name=queue, actor_name=job, args=(), kwargs=kwargs,
                                                      options=options)
    record_dead_letter(message, exc)


class OutboxBookkeeping(dramatiq.Middleware):
    # A job's chunk job: the relay may send its due rows as one message of that job (worker.relay).
    actor_options = {CHUNK_OPTION}  # noqa: RUF012  (Dramatiq reads it as a class attribute)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        # Popped whatever the outcome: a retried message must not carry the flag (this hook runs
        # before Retries' re-enqueue, since after-hooks run in reverse order).
        marked_by_job = message.options.pop("outbox_done", False)
        outbox_id = message.options.get("outbox_id")
        if exception is None and outbox_id is not None and not marked_by_job:
            try:
                context.mark_outbox_done_by_id(outbox_id)
            except Exception:
                # Not fatal: the row is relayed again later and the job is idempotent.
                log.exception("could not mark outbox row %s done", outbox_id)


class OutboxRelayFork(dramatiq.Middleware):
    @property
    def forks(self):
        return [run_relay_fork]


class SentryJobs(SentryMiddleware):
    # A job's share of the environment's trace rate (worker.sentry.traces_rate).
    actor_options = {TRACES_SHARE_OPTION}  # noqa: RUF012  (Dramatiq reads it as a class attribute)

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        set_process_kind("worker")
        install_crash_alerts("worker")
        try:
            init_sentry("worker")
        except Exception:
            log.exception("Sentry could not start; continuing without it")

    # sentry-sdk types this hook with Message, Dramatiq with MessageProxy: the libraries disagree.
    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> None:  # type: ignore[override]
        super().before_process_message(broker, message)
        scope = getattr(message, "_scope_manager", None)
        if scope is None:  # Sentry off
            return
        sentry_sdk.set_tag("request_id", message.options.get("request_id") or message.message_id)
        sentry_sdk.set_tag("job", message.actor_name)


class ErrorCounter(dramatiq.Middleware):
    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy, *,
                              result: object = None, exception: BaseException | None = None) -> None:
        if exception is None or isinstance(exception, Retry):
            return  # Retry is a job asking to run again later, not an error
        # Permanent failures count too (they are declared `throws` only to keep their logs short):
        # a flood of them is an incident.
        try:
            record_job_error(message.actor_name, uuid.uuid4().hex)
        except Exception as error:
            log.warning("could not count job error for the error-spike alert: %s", type(error).__name__)
