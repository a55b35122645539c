"""drop-worker's own Dramatiq middleware.

- RequestContext: every message carries a `request_id` (propagated to provider calls as
  `X-Request-ID`); kept in a contextvar while the job runs.
- DeadLetters: a message that Retries gave up on (or that AgeLimit dropped) is recorded in
  PostgreSQL `dead_letters` with its reason, and its outbox row is closed with that reason so
  the relay never sends it again. `drop-jobs dlq` works on this table.
- OutboxBookkeeping: after a successful run, the message's outbox row is marked done (a job
  that wants the mark inside its own transaction calls `jobs.context.mark_outbox_done(conn)`).
- OutboxRelayFork: runs the outbox relay as a fork beside each worker pool.
"""

from __future__ import annotations

import contextvars
import logging
import uuid

import dramatiq
from psycopg.types.json import Jsonb

log = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("drop_request_id", default=None)


def failure_reason(exc: BaseException | None) -> str:
    """A short, PII-free reason: the exception type and its scrubbed message, cut to 500 characters.

    Our errors name fields, never values; the scrubber is here for everyone else's exceptions."""
    from worker.pii import scrub_text

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


class DeadLetters(dramatiq.Middleware):
    def after_process_message(self, broker, message, *, result=None, exception=None):
        if exception is not None and message.failed:
            record_dead_letter(message, exception)

    def after_skip_message(self, broker, message):
        if message.failed:
            reason = message.options.get("dead_letter_reason") or "skipped: message older than its max_age"
            record_dead_letter(message, None, reason=reason)


def record_dead_letter(message: dramatiq.Message, exc: BaseException | None, *, reason: str | None = None) -> None:
    from db.pool import transaction
    from worker.pii import scrub_text

    reason = scrub_text(reason)[:500] if reason else failure_reason(exc)
    body = message.asdict()
    body["options"] = {k: v for k, v in body["options"].items() if k not in ("traceback", "dead_letter_reason")}
    outbox_id = message.options.get("outbox_id")
    try:
        with transaction() as conn:
            conn.execute(
                """INSERT INTO dead_letters (message_id, job, queue_name, message, outbox_id, reason, retries)
                   VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (message_id) DO UPDATE
                   SET reason = EXCLUDED.reason, retries = EXCLUDED.retries,
                       failed_at = now(), replayed_at = NULL""",
                (
                    message.message_id,
                    message.actor_name,
                    message.queue_name,
                    Jsonb(body),
                    outbox_id,
                    reason,
                    message.options.get("retries", 0),
                ),
            )
            if outbox_id is not None:
                conn.execute(
                    "UPDATE job_outbox SET error = %s WHERE id = %s AND done_at IS NULL",
                    (f"dead-lettered: {reason}", outbox_id),
                )
        log.warning("job %s dead-lettered (message %s): %s", message.actor_name, message.message_id, reason)
    except Exception:
        # The message is still in Dramatiq's own dead-letter queue in Redis.
        log.exception("could not record dead letter %s in PostgreSQL", message.message_id)


class OutboxBookkeeping(dramatiq.Middleware):
    def after_process_message(self, broker, message, *, result=None, exception=None):
        # Popped whatever the outcome: a retried message must not carry the flag (this hook runs
        # before Retries' re-enqueue, since after-hooks run in reverse order).
        marked_by_job = message.options.pop("outbox_done", False)
        outbox_id = message.options.get("outbox_id")
        if exception is None and outbox_id is not None and not marked_by_job:
            from jobs.context import mark_outbox_done_by_id

            try:
                mark_outbox_done_by_id(outbox_id)
            except Exception:
                # Not fatal: the row is relayed again later and the job is idempotent.
                log.exception("could not mark outbox row %s done", outbox_id)


class RescheduleAccounting(dramatiq.Middleware):
    """Keep explicit reschedules (`raise dramatiq.Retry(delay=…)`, e.g. while a breaker is open)
    from using up the 3 transient retries of worker.retry.

    Dramatiq counts both in `options["retries"]`. Listed after Retries, this hook runs just
    before Retries' own: it takes one off for a reschedule (Retries adds it back) and counts
    reschedules separately; past MAX_RESCHEDULES it lets the count through so the policy stops.
    """

    def after_process_message(self, broker, message, *, result=None, exception=None):
        from worker.retry import MAX_RESCHEDULES

        if isinstance(exception, dramatiq.Retry):
            reschedules = message.options.get("reschedules", 0) + 1
            message.options["reschedules"] = reschedules
            if reschedules <= MAX_RESCHEDULES:
                message.options["retries"] = message.options.get("retries", 0) - 1
            else:
                message.options["retries"] = MAX_RESCHEDULES


class OutboxRelayFork(dramatiq.Middleware):
    @property
    def forks(self):
        from jobs.outbox import run_relay_fork

        return [run_relay_fork]
