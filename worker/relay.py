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
import importlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import psycopg
import redis
from dramatiq.cli import make_argument_parser

from db import outbox
from db.pool import connect, transaction
from worker import dramatiq_redis
from worker.alerts import send_alert
from worker.logs import setup_logging
from worker.pii import scrub_text
from worker.redelivery import MaintenanceTimer
from worker.redis_client import get_redis, key

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
# The actor option of a job whose due rows may go as messages of another job, its chunk job
# (kyc.sumsub_webhook → kyc.sumsub_webhook_chunk); declared by worker.middleware.OutboxBookkeeping.
CHUNK_OPTION = "chunk_with"
# Rows of a chunkable job (kyc.sumsub_webhook) go to its chunk job up to this many per message;
# larger rows always alone (a chunk's payloads are read in one statement, in one worker's memory).
CHUNK_SIZE = 100
CHUNK_ROW_MAX_BYTES = 64 * 1024
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
        children: list[Any]
        if isinstance(item, dict):
            children = list(item.values())
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
    return job_message(actor, payload, row["id"], row["idempotency_key"]), None


def request_id_for(idempotency_key: str) -> str:
    """An outbox row's request id: deterministic, so a re-relayed job keeps it across provider calls."""
    return str(uuid.uuid5(_REQUEST_ID_NS, idempotency_key))


def job_message(actor: dramatiq.Actor, payload: dict[str, Any], outbox_id: int,
                idempotency_key: str) -> dramatiq.Message:
    """The message of one outbox row (the relay's, and a chunk's hand-off of one of its rows)."""
    return actor.message_with_options(kwargs=payload, outbox_id=outbox_id,
                                      request_id=request_id_for(idempotency_key))


def chunked(broker: dramatiq.Broker, messages: list[dramatiq.Message],
            sizes: dict[int, int]) -> list[dramatiq.Message]:
    """Messages of a job that declares a chunk job (`chunk_with`, worker.middleware) sent as
    messages of that job with up to CHUNK_SIZE outbox ids each, when more than one is due in this
    pass; alone, or too large, as they are. Nothing waits for a chunk to fill: a quiet pass sends
    single messages, exactly as before chunks existed."""
    groups: dict[str, list[dramatiq.Message]] = {}
    out: list[dramatiq.Message] = []
    for message in messages:
        chunk_job = broker.get_actor(message.actor_name).options.get(CHUNK_OPTION)
        if chunk_job and sizes.get(message.options["outbox_id"], 0) <= CHUNK_ROW_MAX_BYTES:
            groups.setdefault(chunk_job, []).append(message)
        else:
            out.append(message)
    for chunk_job, members in groups.items():
        if len(members) == 1:
            out.extend(members)
            continue
        actor = broker.get_actor(chunk_job)
        for i in range(0, len(members), CHUNK_SIZE):
            part = members[i:i + CHUNK_SIZE]
            out.append(actor.message_with_options(kwargs={"outbox_ids": [m.options["outbox_id"] for m in part]},
                                                  request_id=part[0].options["request_id"]))
    return out


def _message_or_reason(broker: dramatiq.Broker, row: dict) -> tuple[dramatiq.Message | None, str | None]:
    """`_message_for`, and whatever else one row can raise becomes that row's reason."""
    try:
        return _message_for(broker, row)
    except Exception as error:
        return None, f"row cannot become a message ({type(error).__name__})"


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
    broker = dramatiq_redis.global_broker()
    with transaction() as conn:
        # Sizes first, payloads second: the payloads of a batch never exceed the byte budget in
        # the relay's memory, however large the rows that are due.
        sizes = outbox.due_sizes(conn, redeliver_after, limit)
        chosen = within_budget([(r["id"], r["size"]) for r in sizes], byte_budget)
        rows = outbox.rows_to_relay(conn, chosen)
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
        dramatiq_redis.enqueue_many(broker, chunked(broker, messages, {r["id"]: r["size"] for r in sizes}))
        outbox.mark_relayed(conn, sent)
        outbox.close_rejected(conn, rejected)
    for reason, row_id in rejected:
        log.error("outbox row %s rejected: %s", row_id, reason)
    if rejected:
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
    client, epoch_key = get_redis(), key("broker", "epoch")
    if client.exists(epoch_key) or not client.set(epoch_key, str(uuid.uuid4()), nx=True):
        return 0
    with transaction() as conn:
        reopened = outbox.reopen_relayed(conn)
    if reopened:
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
# The module that builds the broker and declares every job (what `dramatiq` is told to load).
COMPOSITION_ROOT = "jobs.app"


def relay_heartbeats_key() -> str:
    return key("relay", "heartbeats")


def beat(heartbeat_file: Path | None) -> None:
    """Say "this relay's loop is alive": a file for the pool wrapper beside it (which takes the
    pool down when the beat stops, so the process manager restarts it) and a Redis entry for
    `/v1/health`. Neither failing may stop the relay; Redis may be the thing that is down."""
    if heartbeat_file is not None:
        with contextlib.suppress(OSError):
            heartbeat_file.write_text(str(os.getpid()))
    with contextlib.suppress(Exception):
        now = time.time()
        client = get_redis()
        pipe = client.pipeline(transaction=False)
        pipe.zadd(relay_heartbeats_key(), {f"{socket.gethostname()}:{os.getpid()}": now})
        pipe.zremrangebyscore(relay_heartbeats_key(), "-inf", now - 10 * RELAY_HEARTBEAT_TTL_S)
        pipe.execute()


def relays_alive(within_s: float = RELAY_HEARTBEAT_TTL_S) -> int:
    """How many relays beat within the last `within_s` seconds (any host)."""
    return int(get_redis().zcount(relay_heartbeats_key(), time.time() - within_s, "+inf"))


def run_relay(stop_after: float | None = None, *, heartbeat_file: Path | None = None,
              stop: threading.Event | None = None) -> None:
    """Relay forever: wake on NOTIFY job_outbox, and poll every POLL_INTERVAL_S regardless.

    Nothing a row, PostgreSQL or Redis does ends this loop: rows that cannot be relayed are
    closed with a reason inside `relay_once`, and any other exception pauses the loop (with a
    growing back-off) and starts it again."""
    deadline = None if stop_after is None else time.monotonic() + stop_after
    stop = stop or threading.Event()

    def running() -> bool:
        return not stop.is_set() and (deadline is None or time.monotonic() < deadline)

    maintenance = MaintenanceTimer(dramatiq_redis.global_broker())
    failures = 0
    while running():
        beat(heartbeat_file)
        try:
            with connect(autocommit=True) as listener:
                listener.execute("LISTEN job_outbox")
                failures = 0
                while running():
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
            _pause(wait, heartbeat_file, stop)
        except Exception as error:
            # A bug or an input nobody foresaw: the type only (the text may carry payload values).
            failures += 1
            wait = min(2**failures, 30)
            log.error("outbox relay pass failed (%s); retrying in %s s", type(error).__name__, wait)
            _pause(wait, heartbeat_file, stop)


def _pause(seconds: float, heartbeat_file: Path | None, stop: threading.Event) -> None:
    """Sleep while still beating: a relay waiting out an outage is alive, not stuck."""
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0 and not stop.wait(min(left, POLL_INTERVAL_S)):
        beat(heartbeat_file)


def run_relay_fork() -> int:
    """Entry point of the relay fork that Dramatiq starts beside each worker pool."""
    # The fork runs inside the `dramatiq` CLI: load the same modules the workers load, so every
    # job they can run is a job the relay can send.
    try:
        cli_args = make_argument_parser().parse_args(sys.argv[1:])
        for module in [cli_args.broker, *cli_args.modules]:
            importlib.import_module(module.split(":")[0])
    except SystemExit:  # not started by the dramatiq CLI: load the composition root by name
        importlib.import_module(COMPOSITION_ROOT)

    setup_logging()
    log.info("outbox relay started")
    heartbeat = os.environ.get(RELAY_HEARTBEAT_FILE_ENV)
    run_relay(heartbeat_file=Path(heartbeat) if heartbeat else None)
    return 0
