"""What a running job knows about itself: its request id and its outbox row."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from dramatiq.middleware import CurrentMessage

from db import outbox
from db.pool import Conn, transaction

# Set by worker.middleware.RequestContext while a job runs.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("drop_request_id", default=None)


def request_id() -> str:
    """The job's request id (propagated as X-Request-ID); a new UUID outside a job."""
    return request_id_var.get() or str(uuid.uuid4())


@contextmanager
def using_request_id(rid: str | None) -> Iterator[None]:
    """`request_id()` is `rid` inside the block: one item of a batch message writes its own
    request id (audit rows), not the batch message's."""
    if rid is None:
        yield
        return
    token = request_id_var.set(rid)
    try:
        yield
    finally:
        request_id_var.reset(token)


def attempts_so_far() -> int:
    """How many times this job's message has been retried so far (0 on its first run)."""
    message = CurrentMessage.get_current_message()
    return int(message.options.get("retries", 0)) if message is not None else 0


def current_outbox_id() -> int | None:
    message = CurrentMessage.get_current_message()
    return None if message is None else message.options.get("outbox_id")


def mark_outbox_done(conn: Conn) -> None:
    """Mark this job's outbox row done inside the caller's transaction (with its effects)."""
    outbox_id = current_outbox_id()
    if outbox_id is not None:
        outbox.mark_done(conn, outbox_id)
        note_outbox_done()


def note_outbox_done() -> None:
    """Tell OutboxBookkeeping the job marked its row itself (saves a transaction per job).

    Call it only for a mark made in a transaction that commits before the job returns; a job
    that returns without raising after a rolled-back mark must not call it."""
    message = CurrentMessage.get_current_message()
    if message is not None:
        message.options["outbox_done"] = True


def mark_outbox_done_by_id(outbox_id: int) -> None:
    with transaction() as conn:
        outbox.mark_done(conn, outbox_id)
