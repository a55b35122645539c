"""The one module that knows Dramatiq's Redis broker from the inside.

Dramatiq has no public API for what drop-worker needs here: sending a batch of messages in one
round trip (the relay), running the broker's maintenance on a timer (bounded redelivery after a
SIGKILL, worker.redelivery), counting messages per queue and live workers (the monitor), and
removing one message from the Redis dead-letter set (`drop-jobs dlq purge`), and marking the
messages it hands back after a worker died (`REDELIVERIES`, read by worker.redelivery's
CrashGuard at no cost per message). Everything below
follows `dramatiq/brokers/redis/dispatch.lua` of the pinned release; the layout it documents:

    <ns>:<queue>                 list of ready message ids (RPUSH, so index 0 is the oldest)
    <ns>:<queue>.msgs            hash: message id -> encoded message
    <ns>:<queue>.DQ              the queue's delayed (retry/backoff) messages, the same shape
    <ns>:<queue>.XQ              sorted set of dead-lettered ids (+ `.XQ.msgs`)
    <ns>:__heartbeats__          sorted set: worker id -> last heartbeat (ms)
    <ns>:__acks__.<worker>.<queue>  set of message ids a worker fetched and has not acked yet

tests/worker/test_dramatiq_redis.py fails when an upgrade changes any of it (the script's ARGV,
the key names, the broker attributes read here).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import dramatiq
import dramatiq.broker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis, dq_name

from worker.settings import Settings

# dispatch.lua's ARGV, in order; the command's own arguments follow.
DISPATCH_ARGV = (
    "command",
    "timestamp",
    "queue_name",
    "worker_id",
    "heartbeat_timeout",
    "dead_message_ttl",
    "do_maintenance",
    "max_unpack_size",
)
HEARTBEATS = "__heartbeats__"
# Every dispatch call leaves a heartbeat under its worker id: the maintenance pass and the relay's
# batch enqueue use these prefixes, so they are not counted as workers ("Workers down" must see
# a pool without consumers as down, whatever else talks to the broker).
MAINTENANCE_ID_PREFIX = "maintenance-"
RELAY_ID_PREFIX = "relay-"
NOT_WORKERS = (MAINTENANCE_ID_PREFIX, RELAY_ID_PREFIX)
# The message option that counts how often a message was taken back from a dead worker (its
# ack set) and queued again. Set only by run_maintenance(), in the message's own data in Redis,
# so a worker reads it with the message: a first delivery costs CrashGuard nothing.
REDELIVERIES = "drop_redeliveries"

# Requeue one dead worker's unacked messages of one queue, each with its new (marked) data.
# KEYS: the dead worker's ack set, the queue's message hash, the queue list; ARGV: id, data, ….
# SREM decides who requeues: of two maintenance passes racing, only one moves each message.
_REQUEUE_MARKED = """
for i = 1, #ARGV, 2 do
    local id = ARGV[i]
    if redis.call('srem', KEYS[1], id) > 0 and redis.call('hexists', KEYS[2], id) > 0 then
        redis.call('hset', KEYS[2], id, ARGV[i + 1])
        redis.call('rpush', KEYS[3], id)
    end
end
return 0
"""


def namespace(settings: Settings) -> str:
    """The Redis namespace of drop-worker's Dramatiq broker (beside its own `<ns>:` keys)."""
    return f"{settings.redis_namespace}-dramatiq"


def global_broker() -> dramatiq.Broker:
    """The broker this process installed; never Dramatiq's silent default RedisBroker."""
    broker = dramatiq.broker.global_broker
    if broker is None:
        raise RuntimeError("no broker installed in this process (import jobs.app, the composition root)")
    return broker


def _dispatch(broker: RedisBroker, command: str, queue: str, *args: Any, worker_id: str | None = None,
              do_maintenance: int = 0, client: Any = None, timestamp: int | None = None) -> Any:
    argv = [
        command,
        current_millis() if timestamp is None else timestamp,
        queue,
        worker_id or broker.broker_id,
        broker.heartbeat_timeout,
        broker.dead_message_ttl,
        do_maintenance,
        broker._max_unpack_size(),
        *args,
    ]
    kwargs = {} if client is None else {"client": client}
    return broker.scripts["dispatch"](keys=[broker.namespace], args=argv, **kwargs)


def enqueue_many(broker: dramatiq.Broker, messages: Sequence[dramatiq.Message]) -> None:
    """Enqueue messages in one Redis round trip, with the broker's own middleware hooks.

    `RedisBroker.enqueue` costs one round trip per message; at the fan-out's scale (a million
    refreshes per slot) that round trip, not PostgreSQL, bounded the relay. This does what
    RedisBroker.enqueue does for each message (fresh redis_message_id, before/after_enqueue
    hooks, the `dispatch` script's "enqueue" command), only sent as one pipeline. Not atomic:
    like a crash between sends, a failure part-way leaves the batch unmarked and it is sent
    again, which at-least-once delivery allows. Other brokers (tests' stub) use enqueue().
    """
    if not isinstance(broker, RedisBroker) or not messages:
        for message in messages:
            broker.enqueue(message)
        return
    prepared = []
    for message in messages:
        message = message.copy(options={"redis_message_id": str(uuid.uuid4())})
        broker.emit_before("enqueue", message, None)
        prepared.append(message)
    pipe = broker.client.pipeline(transaction=False)
    now = current_millis()
    for message in prepared:
        _dispatch(broker, "enqueue", message.queue_name, message.options["redis_message_id"], message.encode(),
                  client=pipe, timestamp=now, worker_id=f"{RELAY_ID_PREFIX}{os.getpid()}")
    pipe.execute()
    for message in prepared:
        broker.emit_after("enqueue", message, None)


def run_maintenance(broker: dramatiq.Broker) -> None:
    """Dramatiq's maintenance on every declared queue: requeue dead workers' unacked messages,
    expire old dead letters. drop-worker's brokers leave Dramatiq's random maintenance off
    (worker.broker), so this is the one place that requeues, and it first requeues each dead
    worker's messages of a work queue itself, counting the redelivery in the message
    (`REDELIVERIES`); Dramatiq's pass then finds those ack sets empty and does the rest
    (delayed queues, dead-letter expiry, removing the dead worker's heartbeat)."""
    if not isinstance(broker, RedisBroker):
        return
    now = current_millis()
    queues = set(broker.get_declared_queues())
    work_queues = sorted(q for q in queues if not q.endswith(".DQ"))
    dead = [w.decode() if isinstance(w, bytes) else w
            for w in broker.client.zrangebyscore(f"{broker.namespace}:{HEARTBEATS}", 0, now - broker.heartbeat_timeout)]
    for worker_id in dead:
        if worker_id.startswith(NOT_WORKERS):
            continue
        for queue in work_queues:
            requeue_marked(broker, worker_id, queue)
    queues |= {dq_name(q) for q in work_queues}
    for queue in sorted(queues):
        _dispatch(broker, "qsize", queue, worker_id=f"{MAINTENANCE_ID_PREFIX}{os.getpid()}", do_maintenance=1,
                  timestamp=now)


def requeue_marked(broker: RedisBroker, worker_id: str, queue: str) -> int:
    """Requeue a dead worker's unacked messages of `queue`, each with REDELIVERIES raised by one."""
    client, ns = broker.client, broker.namespace
    acks, messages = f"{ns}:__acks__.{worker_id}.{queue}", f"{ns}:{queue}.msgs"
    ids = list(client.smembers(acks))
    if not ids:
        return 0
    argv: list[Any] = []
    for redis_id, data in zip(ids, client.hmget(messages, ids), strict=True):
        if data is None:
            continue  # acked meanwhile, or gone with its queue: Dramatiq's pass drops the id
        try:
            message = dramatiq.Message.decode(data)
        except Exception:  # noqa: S112  (not ours to judge here: Dramatiq's pass requeues it as it is)
            continue
        options = {**message.options, REDELIVERIES: int(message.options.get(REDELIVERIES) or 0) + 1}
        argv += [redis_id, message.copy(options=options).encode()]
    if not argv:
        return 0
    script = getattr(broker, "_drop_requeue_marked", None)
    if script is None:
        script = broker._drop_requeue_marked = client.register_script(_REQUEUE_MARKED)  # type: ignore[attr-defined]
    script(keys=[acks, messages, f"{ns}:{queue}"], args=argv)
    return len(argv) // 2


def declared_queues(names: Iterable[str] = ()) -> list[str]:
    """`names` (the job registry's queues) and those of this process's broker, if it has one.
    No SCAN of the keyspace: the monitor asks every 10 s, and Redis may hold millions of keys."""
    found = set(names)
    broker = dramatiq.broker.global_broker
    if broker is not None:
        found |= set(broker.get_declared_queues())
    return sorted(q for q in found if not q.endswith((".DQ", ".XQ")))


def queue_stats(client: Any, ns: str, queues: Sequence[str]) -> list[dict[str, Any]]:
    """Ready, delayed, in flight (taken by a worker, not yet acked) and (Redis-side) dead
    messages per queue. In flight: the ack set `<ns>:__acks__.<worker>.<queue>` of every worker
    in the heartbeat set (a dead worker's are in flight until Dramatiq requeues them)."""
    names = sorted(q for q in queues if not q.endswith(".DQ"))
    worker_ids = [m.decode() if isinstance(m, bytes) else m for m in client.zrange(f"{ns}:{HEARTBEATS}", 0, -1)]
    pipe = client.pipeline(transaction=False)
    for q in names:
        pipe.llen(f"{ns}:{q}")
        pipe.llen(f"{ns}:{dq_name(q)}")
        pipe.zcard(f"{ns}:{q}.XQ")
        for wid in worker_ids:
            pipe.scard(f"{ns}:__acks__.{wid}.{q}")
    values = iter(pipe.execute())
    stats = []
    for q in names:
        ready, delayed, dead = next(values), next(values), next(values)
        in_flight = sum(next(values) for _ in worker_ids)
        stats.append({"queue": q, "ready": ready, "delayed": delayed, "in_flight": in_flight, "dead": dead})
    return stats


def queue_oldest_age(client: Any, ns: str, queues: Sequence[str]) -> dict[str, float]:
    """Age in seconds of the oldest ready message per queue (0 when empty)."""
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.lindex(f"{ns}:{q}", 0)
    heads = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for q, head in zip(queues, heads, strict=True):
        pipe.hget(f"{ns}:{q}.msgs", head or b"-")
    bodies = pipe.execute()
    now_ms = time.time() * 1000
    ages: dict[str, float] = {}
    for q, body in zip(queues, bodies, strict=True):
        age = 0.0
        if body:
            try:
                age = max(0.0, (now_ms - float(json.loads(body)["message_timestamp"])) / 1000)
            except (ValueError, KeyError, TypeError):
                age = 0.0
        ages[q] = age
    return ages


def workers_alive(client: Any, ns: str, within_ms: int = 30_000) -> int:
    """Worker consumers whose heartbeat Dramatiq saw within `within_ms` (maintenance excluded)."""
    now_ms = int(time.time() * 1000)
    members = client.zrangebyscore(f"{ns}:{HEARTBEATS}", now_ms - within_ms, "+inf")
    return sum(1 for m in members if not (m.decode() if isinstance(m, bytes) else m).startswith(NOT_WORKERS))


def drop_dead_message(client: Any, ns: str, queue: str, redis_message_id: str) -> None:
    """Remove one message from Dramatiq's Redis dead-letter set of `queue`."""
    xq = f"{ns}:{queue.removesuffix('.DQ')}.XQ"
    client.zrem(xq, redis_message_id)
    client.hdel(f"{xq}.msgs", redis_message_id)
