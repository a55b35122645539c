"""Issue 9 points 1 and 5: SIGKILLed workers and a graceful SIGTERM under a mixed load.

Real `dramatiq jobs.app` processes (each with its outbox relay fork) against this test's schema and
Redis namespace, the sandbox over HTTP. Effects are counted in PostgreSQL, requests at the sandbox.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
import redis

from tests.conftest import BASE_REDIS_URL, wait_for

from . import workload
from .conftest import figure, scaled


def in_flight_outbox_ids(namespace: str) -> set[int]:
    """Outbox ids of every message a worker holds unacked right now (Dramatiq's ack sets), the
    rows of a chunk message included."""
    client = redis.Redis.from_url(BASE_REDIS_URL, decode_responses=True)
    prefix = f"{namespace}-dramatiq"
    ids: set[int] = set()
    try:
        for ack_key in client.scan_iter(match=f"{prefix}:__acks__.*", count=1000):
            queue = ack_key[len(prefix) + len(":__acks__."):].split(".", 1)[1]
            message_ids = list(client.smembers(ack_key))
            if not message_ids:
                continue
            import json

            for raw in client.hmget(f"{prefix}:{queue}.msgs", message_ids):
                if raw:
                    message = json.loads(raw)
                    outbox_id = message.get("options", {}).get("outbox_id")
                    if outbox_id is not None:
                        ids.add(int(outbox_id))
                    # A chunk message (KYC webhooks, payment polls) holds many rows.
                    ids.update(int(i) for i in message.get("kwargs", {}).get("outbox_ids") or ())
    finally:
        client.close()
    return ids


def held_messages(namespace: str) -> set[tuple[str, str]]:
    """(ack set, Redis message id) of every message a worker holds unacked right now."""
    client = redis.Redis.from_url(BASE_REDIS_URL, decode_responses=True)
    try:
        return {(key, mid) for key in client.scan_iter(match=f"{namespace}-dramatiq:__acks__.*", count=1000)
                for mid in client.smembers(key)}
    finally:
        client.close()


def still_held(pairs: set[tuple[str, str]]) -> int:
    """How many of those are still in the ack set they were in (not requeued, not acked)."""
    client = redis.Redis.from_url(BASE_REDIS_URL)
    try:
        pipe = client.pipeline(transaction=False)
        for key, mid in pairs:
            pipe.sismember(key, mid)
        return sum(1 for held in pipe.execute() if held)
    finally:
        client.close()


def not_done(sql, ids: set[int]) -> int:
    if not ids:
        return 0
    return sql("SELECT count(*) AS n FROM job_outbox WHERE id = ANY(%s) AND done_at IS NULL", (list(ids),))[0]["n"]


def done(sql) -> int:
    return sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL")[0]["n"]


def test_sigkill_at_random_moments_every_effect_exactly_once(db, sql, sandbox, procs, capture, redis_namespace):
    rng = random.Random()
    kills = 2 if scaled(1) == 1 else 6
    w = workload.build(db, sandbox, capture.seeds, kyc=scaled(400), payments=scaled(150), accounts=scaled(150),
                       spread_s=20 * min(scaled(1), 5))
    capture.bodies += w.bodies
    # Provider answers take a moment, as real ones do: kills find jobs mid-request.
    sandbox.fault("neonomics.*", latency_ms=250)
    started = time.monotonic()
    workers = [procs.worker(threads=4), procs.worker(threads=4)]
    redelivery: list[float] = []
    effect: list[float] = []
    held: list[int] = []
    pending: list[tuple[float, set[int], set[tuple[str, str]]]] = []
    for _ in range(kills):
        # A random moment while work is in flight (something unacked in a worker).
        time.sleep(rng.uniform(1.5, 4.0))
        wait_for(lambda: in_flight_outbox_ids(redis_namespace), timeout=60, interval=0.01, what="work in flight")
        victim = rng.randrange(len(workers))
        snapshot = in_flight_outbox_ids(redis_namespace)
        acks = held_messages(redis_namespace)
        procs.kill(workers[victim], signal.SIGKILL)
        pending.append((time.monotonic(), snapshot, acks))
        held.append(len(snapshot))
        workers[victim] = procs.worker(threads=4)  # the process manager restarts it
    # Redelivery of each kill: until every message held unacked at that moment is back in circulation
    # (requeued by the maintenance pass, or acked by a live worker). With a large backlog the effect
    # lands later — requeued messages go to the back of the queue — so that is reported separately.
    for killed_at, _, acks in pending:
        wait_for(lambda acks=acks: still_held(acks) == 0, timeout=60, interval=0.1,
                 what=f"the {len(acks)} messages held when worker {len(redelivery) + 1} was killed to be requeued")
        redelivery.append(time.monotonic() - killed_at)
    for killed_at, ids, _ in pending:
        wait_for(lambda ids=ids: not_done(sql, ids) == 0, timeout=120 * min(scaled(1), 5), interval=0.1,
                 what=f"the {len(ids)} messages unacked at kill {len(effect) + 1} to have their effect")
        effect.append(time.monotonic() - killed_at)
    wait_for(lambda: done(sql) == w.jobs, timeout=120 * min(scaled(1), 5), interval=0.2, what="every job done")
    elapsed = time.monotonic() - started
    for proc in workers:
        assert proc.poll() is None, "a worker crashed on its own"
    c = workload.assert_exact(sql, w, sandbox)
    # Payment polls: one status read per payment, plus at most one per message a kill interrupted.
    assert len(w.payments) <= c["status_requests"] <= len(w.payments) + sum(held)
    assert c["balance_requests"] <= len(w.accounts) + sum(held)
    figure("sigkill", jobs=w.jobs, kyc=len(w.users), resends=w.resends, payments=len(w.payments),
           accounts=len(w.accounts), kills=kills, held_by_killed_worker=held,
           redelivery_s=[round(r, 1) for r in redelivery], max_redelivery_s=round(max(redelivery), 1),
           effect_after_kill_s=[round(e, 1) for e in effect],
           status_requests=c["status_requests"], balance_requests=c["balance_requests"],
           aisp_ledger=c["aisp_ledger"], total_s=round(elapsed, 1))
    assert max(redelivery) <= 30, redelivery


def test_sigterm_to_the_pool_finishes_or_requeues_in_flight_jobs(db, sql, sandbox, procs, capture):
    # Slow provider answers keep jobs in flight when the signal arrives.
    w = workload.build(db, sandbox, capture.seeds, kyc=scaled(60), payments=scaled(60), accounts=scaled(60))
    capture.bodies += w.bodies
    sandbox.fault("neonomics.*", latency_ms=700)
    pool = procs.pool(threads=4)
    wait_for(lambda: done(sql) >= 10, timeout=60, what="the pool at work")
    terminated_at = time.monotonic()
    pool.send_signal(signal.SIGTERM)  # one signal to the wrapper, as a process manager sends it
    rc = pool.wait(45)
    stopped_in = time.monotonic() - terminated_at
    at_stop = done(sql)
    statuses_at_stop = sandbox.count("neonomics.status")
    assert rc == 0, f"worker.pool exited {rc}"
    # Nothing half-done: every job that reached the provider before the stop has its effect.
    c = workload.counts(sql)
    dead = sql("SELECT job, reason FROM dead_letters")
    assert dead == [], dead
    assert c["completed"] == statuses_at_stop, (c, statuses_at_stop)
    sandbox.clear_faults()
    restarted = time.monotonic()
    procs.pool(threads=4)
    wait_for(lambda: done(sql) == w.jobs, timeout=60, what="the rest after restart")
    rest_in = time.monotonic() - restarted
    c = workload.assert_exact(sql, w, sandbox)
    # Requeued, not dead-lettered nor left for the heartbeat-timeout redelivery: the rest ran
    # right after restart. A request interrupted by the shutdown (≤ 4 threads) is sent again.
    assert len(w.payments) <= c["status_requests"] <= len(w.payments) + 4
    assert len(w.accounts) <= c["balance_requests"] <= len(w.accounts) + 4
    figure("sigterm", jobs=w.jobs, done_at_stop=at_stop, stop_s=round(stopped_in, 1),
           rest_after_restart_s=round(rest_in, 1), status_requests=c["status_requests"],
           balance_requests=c["balance_requests"])
    assert stopped_in < 35


pytestmark = pytest.mark.slow
