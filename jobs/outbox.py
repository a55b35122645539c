"""The outbox relay: moves `job_outbox` rows to the broker, at least once.

Several relays may run (one beside each worker pool): each takes a batch with
`FOR UPDATE SKIP LOCKED`, sends it, and marks it relayed in the same transaction. A crash
between send and commit sends the batch again; jobs are idempotent, so effects stay exact.
A row relayed long ago but never done (Redis lost the message) is relayed again. Rows that
cannot become a message (unknown job, payload not an object) are closed with the reason and
alerted.

Redis loss (FLUSHALL, a restart without persistence) is noticed at once rather than after
REDELIVER_AFTER: the relay keeps an "epoch" key in Redis; when it is gone, every row relayed
but not done is relayed again on the next pass (a few seconds).

Where it runs: as a Dramatiq fork beside each worker pool (worker.middleware.OutboxRelayFork).
A relay is only useful where workers consume, it scales with the pools, needs no extra process
kind to deploy or monitor, and SKIP LOCKED lets any number run side by side.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import dramatiq
import psycopg
import redis

from db.pool import connect, transaction

log = logging.getLogger(__name__)

BATCH_SIZE = 500
POLL_INTERVAL_S = 2.0
# A message relayed this long ago whose job never finished is presumed lost with Redis.
REDELIVER_AFTER = timedelta(minutes=10)
_REQUEST_ID_NS = uuid.UUID("5d1f6c1e-2a7b-4d8e-9c43-6f0b1d2e3a45")


@dataclass(frozen=True)
class RelayResult:
    sent: int
    rejected: int


def _message_for(broker: dramatiq.Broker, row: dict) -> tuple[dramatiq.Message | None, str | None]:
    try:
        actor = broker.get_actor(row["job"])
    except dramatiq.errors.ActorNotFound:
        return None, f"unknown job {row['job']!r}"
    if not isinstance(row["payload"], dict):
        return None, "payload is not a JSON object"
    message = actor.message_with_options(
        kwargs=row["payload"],
        outbox_id=row["id"],
        # Deterministic, so a re-relayed job keeps its request id across provider calls.
        request_id=str(uuid.uuid5(_REQUEST_ID_NS, row["idempotency_key"])),
    )
    return message, None


def enqueue_many(broker: dramatiq.Broker, messages: list[dramatiq.Message]) -> None:
    """Enqueue messages in one Redis round trip (a pipeline), with the broker's own middleware hooks.

    `RedisBroker.enqueue` costs one round trip per message; at the fan-out's scale (a million
    refreshes per slot) that round trip, not PostgreSQL, bounded the relay. This does what
    RedisBroker.enqueue does for each message (fresh redis_message_id, before/after_enqueue
    hooks, the `dispatch` script's "enqueue" command), only sent as one pipeline. Not atomic:
    like a crash between sends, a failure part-way leaves the batch unmarked and it is sent
    again, which at-least-once delivery allows. Other brokers (tests' stub) fall back to enqueue().
    """
    dispatch = getattr(broker, "scripts", {}).get("dispatch")
    if dispatch is None or not messages:
        for message in messages:
            broker.enqueue(message)
        return
    from dramatiq.common import current_millis

    prepared = []
    for message in messages:
        message = message.copy(options={"redis_message_id": str(uuid.uuid4())})
        broker.emit_before("enqueue", message, None)
        prepared.append(message)
    pipe = broker.client.pipeline(transaction=False)  # type: ignore[attr-defined]
    now = current_millis()
    for message in prepared:
        dispatch(keys=[broker.namespace], client=pipe,  # type: ignore[attr-defined]
                 args=["enqueue", now, message.queue_name, broker.broker_id,  # type: ignore[attr-defined]
                       broker.heartbeat_timeout, broker.dead_message_ttl, 0,  # type: ignore[attr-defined]
                       broker._max_unpack_size(),  # type: ignore[attr-defined]
                       message.options["redis_message_id"], message.encode()])
    pipe.execute()
    for message in prepared:
        broker.emit_after("enqueue", message, None)


def relay_once(limit: int = BATCH_SIZE, *, redeliver_after: timedelta = REDELIVER_AFTER) -> RelayResult:
    """Relay up to `limit` due rows; return how many were sent and rejected."""
    broker = dramatiq.get_broker()
    with transaction() as conn:
        rows = conn.execute(
            """SELECT id, job, payload, idempotency_key
                 FROM job_outbox
                WHERE done_at IS NULL AND error IS NULL AND available_at <= now()
                  AND (relayed_at IS NULL OR relayed_at < now() - %s)
                ORDER BY id
                LIMIT %s
                FOR UPDATE SKIP LOCKED""",
            (redeliver_after, limit),
        ).fetchall()
        sent: list[int] = []
        messages: list[dramatiq.Message] = []
        rejected: list[tuple[str, int]] = []
        for row in rows:
            message, problem = _message_for(broker, row)
            if message is None:
                rejected.append((problem or "invalid", row["id"]))
                continue
            messages.append(message)
            sent.append(row["id"])
        enqueue_many(broker, messages)
        if sent:
            conn.execute(
                "UPDATE job_outbox SET relayed_at = now(), relay_count = relay_count + 1 WHERE id = ANY(%s)",
                (sent,),
            )
        if rejected:
            conn.cursor().executemany("UPDATE job_outbox SET error = %s WHERE id = %s", rejected)
    for reason, row_id in rejected:
        log.error("outbox row %s rejected: %s", row_id, reason)
    if rejected:
        from monitoring.alerts import send_alert

        send_alert(
            "high",
            "Outbox rows rejected",
            f"{len(rejected)} outbox row(s) could not become a job ({rejected[0][0]}, …): the caller sent "
            "an unknown job name or a payload that is not a JSON object. See job_outbox.error.",
            key="outbox-rejected",
            runbook="outbox-rows-rejected",
        )
    return RelayResult(sent=len(sent), rejected=len(rejected))


def check_broker_epoch() -> int:
    """If Redis lost its data since the last pass, reopen relayed-but-not-done rows; return how many."""
    from worker.redis_client import get_redis, key

    client, epoch_key = get_redis(), key("broker", "epoch")
    if client.exists(epoch_key) or not client.set(epoch_key, str(uuid.uuid4()), nx=True):
        return 0
    with transaction() as conn:
        reopened = conn.execute(
            """UPDATE job_outbox SET relayed_at = NULL
                WHERE relayed_at IS NOT NULL AND done_at IS NULL AND error IS NULL"""
        ).rowcount
    if reopened:
        from monitoring.alerts import send_alert

        log.warning("Redis lost its queues: %d outbox row(s) will be relayed again", reopened)
        send_alert(
            "warning",
            "Redis lost queued work",
            f"The broker's data was lost (restart without persistence or flush); {reopened} job(s) "
            "were re-sent from the PostgreSQL outbox. Nothing is lost; jobs are idempotent.",
            key="redis-epoch-reset",
            runbook="redis-lost-queued-work",
        )
    return reopened


def drain(limit: int = BATCH_SIZE) -> int:
    """Relay until nothing is due; return the number sent."""
    total = 0
    while True:
        result = relay_once(limit)
        total += result.sent
        if result.sent + result.rejected < limit:
            return total


def run_relay(stop_after: float | None = None) -> None:
    """Relay forever: wake on NOTIFY job_outbox, and poll every POLL_INTERVAL_S regardless."""
    from worker.redelivery import MaintenanceTimer

    deadline = None if stop_after is None else time.monotonic() + stop_after
    maintenance = MaintenanceTimer(dramatiq.get_broker())
    failures = 0
    while deadline is None or time.monotonic() < deadline:
        try:
            with connect(autocommit=True) as listener:
                listener.execute("LISTEN job_outbox")
                failures = 0
                while deadline is None or time.monotonic() < deadline:
                    check_broker_epoch()
                    drain()
                    maintenance.tick()
                    # Any notification (or the timeout) starts the next pass.
                    for _ in listener.notifies(timeout=POLL_INTERVAL_S, stop_after=1):
                        pass
        except (psycopg.Error, OSError, redis.exceptions.RedisError) as error:
            # Database or Redis trouble (restart, failover, a missing migration): keep trying.
            failures += 1
            wait = min(2**failures, 30)
            log.warning("outbox relay paused (%s); retrying in %s s", type(error).__name__, wait)
            time.sleep(wait)


def run_relay_fork() -> int:
    """Entry point of the relay fork that Dramatiq starts beside each worker pool."""
    import importlib
    import sys

    from dramatiq.cli import make_argument_parser

    import jobs  # noqa: F401  (installs the broker and registers the actors)
    from worker.logs import setup_logging

    # The fork runs inside the `dramatiq` CLI: load the same modules the workers load, so every
    # job they can run is a job the relay can send.
    try:
        cli_args = make_argument_parser().parse_args(sys.argv[1:])
        for module in [cli_args.broker, *cli_args.modules]:
            importlib.import_module(module.split(":")[0])
    except SystemExit:  # not started by the dramatiq CLI
        pass

    setup_logging()
    log.info("outbox relay started")
    run_relay()
    return 0
