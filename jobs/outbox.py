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

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import dramatiq
import psycopg
import redis

from db.pool import connect, transaction
from worker.pii import scrub_text

log = logging.getLogger(__name__)

BATCH_SIZE = 500
POLL_INTERVAL_S = 2.0
# Payload bytes one batch may hold in the relay's memory (rows are at most 2 MiB each, a CHECK
# on job_outbox); a batch of large rows is cut here and the rest go in the next pass.
BATCH_BYTE_BUDGET = 16 * 1024 * 1024
# A message relayed this long ago whose job never finished is presumed lost with Redis.
REDELIVER_AFTER = timedelta(minutes=10)
# Set by worker.pool: the file the relay fork beats into, watched by the pool wrapper.
RELAY_HEARTBEAT_FILE_ENV = "DROP_RELAY_HEARTBEAT_FILE"
_REQUEST_ID_NS = uuid.UUID("5d1f6c1e-2a7b-4d8e-9c43-6f0b1d2e3a45")


@dataclass(frozen=True)
class RelayResult:
    sent: int
    rejected: int
    more: bool = False  # the batch was cut by its row limit or byte budget: rows may still be due


def decode_payload(text: str) -> tuple[object | None, str | None]:
    """The row's payload as Python, or a reason it cannot be one.

    PostgreSQL's jsonb accepts what Python's json cannot turn back into objects (nesting
    deeper than the interpreter's recursion limit, integers of more than 4,300 digits): the
    payload arrives as text and is decoded here, per row, so one such row is closed with a
    reason instead of stopping the relay for every other row.
    """
    try:
        payload = json.loads(text)
    except RecursionError:
        return None, "payload is nested too deeply to decode"
    except ValueError as error:  # includes the int-digits limit and invalid JSON
        return None, f"payload cannot be decoded ({type(error).__name__})"
    if nesting_depth(payload) > MAX_PAYLOAD_DEPTH:
        # Decodable here, but encoding it again deeper in the call stack (the broker's message
        # encoder) could still recurse too far and fail the whole batch.
        return None, f"payload is nested deeper than {MAX_PAYLOAD_DEPTH} levels"
    return payload, None


MAX_PAYLOAD_DEPTH = 64


def nesting_depth(value: object) -> int:
    """How deeply lists and objects nest in `value` (iterative: no recursion to run out of)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_PAYLOAD_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _message_for(broker: dramatiq.Broker, row: dict) -> tuple[dramatiq.Message | None, str | None]:
    try:
        actor = broker.get_actor(row["job"])
    except dramatiq.errors.ActorNotFound:
        return None, f"unknown job {scrub_text(row['job'])[:200]!r}"
    payload, problem = decode_payload(row["payload_text"])
    if problem is not None:
        return None, problem
    if not isinstance(payload, dict):
        return None, "payload is not a JSON object"
    message = actor.message_with_options(
        kwargs=payload,
        outbox_id=row["id"],
        # Deterministic, so a re-relayed job keeps its request id across provider calls.
        request_id=str(uuid.uuid5(_REQUEST_ID_NS, row["idempotency_key"])),
    )
    return message, None


def _message_or_reason(broker: dramatiq.Broker, row: dict) -> tuple[dramatiq.Message | None, str | None]:
    """`_message_for`, and whatever else one row can raise becomes that row's reason."""
    try:
        return _message_for(broker, row)
    except Exception as error:
        return None, f"row cannot become a message ({type(error).__name__})"


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


def within_budget(sizes: list[tuple[int, int]], budget: int) -> list[int]:
    """The ids (in order) whose payload bytes fit in `budget`; always at least the first, so a
    row at the size limit still moves when the budget is smaller than it."""
    chosen: list[int] = []
    used = 0
    for row_id, size in sizes:
        if chosen and used + size > budget:
            break
        chosen.append(row_id)
        used += size
    return chosen


def relay_once(limit: int = BATCH_SIZE, *, redeliver_after: timedelta = REDELIVER_AFTER,
               byte_budget: int = BATCH_BYTE_BUDGET) -> RelayResult:
    """Relay up to `limit` due rows (and at most `byte_budget` payload bytes); return the counts."""
    broker = dramatiq.get_broker()
    with transaction() as conn:
        # Sizes first, payloads second: the payloads of a batch never exceed the byte budget in
        # the relay's memory, however large the rows that are due.
        sizes = conn.execute(
            """SELECT id, octet_length(payload::text) AS size
                 FROM job_outbox
                WHERE done_at IS NULL AND error IS NULL AND available_at <= now()
                  AND (relayed_at IS NULL OR relayed_at < now() - %s)
                ORDER BY id
                LIMIT %s
                FOR UPDATE SKIP LOCKED""",
            (redeliver_after, limit),
        ).fetchall()
        chosen = within_budget([(r["id"], r["size"]) for r in sizes], byte_budget)
        rows = conn.execute(
            """SELECT id, job, payload::text AS payload_text, idempotency_key
                 FROM job_outbox WHERE id = ANY(%s) ORDER BY id""",
            (chosen,),
        ).fetchall() if chosen else []
        sent: list[int] = []
        messages: list[dramatiq.Message] = []
        rejected: list[tuple[str, int]] = []
        for row in rows:
            message, problem = _message_or_reason(broker, row)
            if message is None:
                rejected.append((problem or "invalid", row["id"]))
                continue
            messages.append(message)
            sent.append(row["id"])
        del rows
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
            "an unknown job name, a payload that is not a JSON object or one that cannot be decoded. "
            "See job_outbox.error.",
            key="outbox-rejected",
            runbook="outbox-rows-rejected",
        )
    return RelayResult(sent=len(sent), rejected=len(rejected), more=len(sizes) >= limit or len(chosen) < len(sizes))


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


def drain(limit: int = BATCH_SIZE, *, heartbeat_file: Path | None = None) -> int:
    """Relay until nothing is due; return the number sent."""
    total = 0
    while True:
        if heartbeat_file is not None:
            beat(heartbeat_file)  # a long backlog is progress, not a stuck relay
        result = relay_once(limit)
        total += result.sent
        if not result.more:
            return total


RELAY_HEARTBEAT_TTL_S = 30


def relay_heartbeats_key() -> str:
    from worker.redis_client import key

    return key("relay", "heartbeats")


def beat(heartbeat_file: Path | None) -> None:
    """Say "this relay's loop is alive": a file for the pool wrapper beside it (which takes the
    pool down when the beat stops, so the process manager restarts it) and a Redis entry for
    `/v1/health`. Neither failing may stop the relay; Redis may be the thing that is down."""
    if heartbeat_file is not None:
        with contextlib.suppress(OSError):
            heartbeat_file.write_text(str(os.getpid()))
    with contextlib.suppress(Exception):
        from worker.redis_client import get_redis

        now = time.time()
        client = get_redis()
        pipe = client.pipeline(transaction=False)
        pipe.zadd(relay_heartbeats_key(), {f"{socket.gethostname()}:{os.getpid()}": now})
        pipe.zremrangebyscore(relay_heartbeats_key(), "-inf", now - 10 * RELAY_HEARTBEAT_TTL_S)
        pipe.execute()


def relays_alive(within_s: float = RELAY_HEARTBEAT_TTL_S) -> int:
    """How many relays beat within the last `within_s` seconds (any host)."""
    from worker.redis_client import get_redis

    return int(get_redis().zcount(relay_heartbeats_key(), time.time() - within_s, "+inf"))


def run_relay(stop_after: float | None = None, *, heartbeat_file: Path | None = None) -> None:
    """Relay forever: wake on NOTIFY job_outbox, and poll every POLL_INTERVAL_S regardless.

    Nothing a row, PostgreSQL or Redis does ends this loop: rows that cannot be relayed are
    closed with a reason inside `relay_once`, and any other exception pauses the loop (with a
    growing back-off) and starts it again."""
    from worker.redelivery import MaintenanceTimer

    deadline = None if stop_after is None else time.monotonic() + stop_after
    maintenance = MaintenanceTimer(dramatiq.get_broker())
    failures = 0
    while deadline is None or time.monotonic() < deadline:
        beat(heartbeat_file)
        try:
            with connect(autocommit=True) as listener:
                listener.execute("LISTEN job_outbox")
                failures = 0
                while deadline is None or time.monotonic() < deadline:
                    beat(heartbeat_file)
                    check_broker_epoch()
                    drain(heartbeat_file=heartbeat_file)
                    maintenance.tick()
                    # Any notification (or the timeout) starts the next pass.
                    for _ in listener.notifies(timeout=POLL_INTERVAL_S, stop_after=1):
                        pass
        except (psycopg.Error, OSError, redis.exceptions.RedisError) as error:
            # Database or Redis trouble (restart, failover, a missing migration): keep trying.
            failures += 1
            wait = min(2**failures, 30)
            log.warning("outbox relay paused (%s); retrying in %s s", type(error).__name__, wait)
            _pause(wait, heartbeat_file)
        except Exception as error:
            # A bug or an input nobody foresaw: the type only (the text may carry payload values).
            failures += 1
            wait = min(2**failures, 30)
            log.error("outbox relay pass failed (%s); retrying in %s s", type(error).__name__, wait)
            _pause(wait, heartbeat_file)


def _pause(seconds: float, heartbeat_file: Path | None) -> None:
    """Sleep while still beating: a relay waiting out an outage is alive, not stuck."""
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(left, POLL_INTERVAL_S))
        beat(heartbeat_file)


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
    heartbeat = os.environ.get(RELAY_HEARTBEAT_FILE_ENV)
    run_relay(heartbeat_file=Path(heartbeat) if heartbeat else None)
    return 0
