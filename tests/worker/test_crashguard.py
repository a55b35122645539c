"""CrashGuard counts only redeliveries: a first delivery costs no Redis call, the maintenance pass
marks what it takes back from a dead worker, and a message that keeps killing its worker is
dead-lettered after MAX_CRASHES (the end-to-end kill test is tests/jobs/test_recovery.py)."""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.common import current_millis
from dramatiq.middleware import SkipMessage

from worker import dramatiq_redis, redelivery
from worker.dramatiq_redis import REDELIVERIES


def _declare(broker) -> dramatiq.Actor:
    if "test.crash_probe" in broker.actors:  # one broker for the whole test session
        return broker.actors["test.crash_probe"]

    @dramatiq.actor(actor_name="test.crash_probe", queue_name="crashguard", broker=broker)
    def probe(n: int) -> None:
        pass

    return probe


def _take_as_dead_worker(broker, worker_id: str) -> None:
    """What a worker that then died does: fetch (the message enters its ack set), heartbeat long ago."""
    long_ago = current_millis() - 10 * broker.heartbeat_timeout
    dramatiq_redis._dispatch(broker, "fetch", "crashguard", 10, worker_id=worker_id, timestamp=long_ago)


def _queued(broker) -> list[dramatiq.Message]:
    ns = broker.namespace
    ids = broker.client.lrange(f"{ns}:crashguard", 0, -1)
    return [dramatiq.Message.decode(d) for d in broker.client.hmget(f"{ns}:crashguard.msgs", ids)] if ids else []


def test_maintenance_marks_what_it_takes_back_from_a_dead_worker_once_per_death(broker):
    probe = _declare(broker)
    broker.enqueue(probe.message(1))
    _take_as_dead_worker(broker, "dead-1")
    assert _queued(broker) == []  # in the dead worker's hands
    dramatiq_redis.run_maintenance(broker)
    dramatiq_redis.run_maintenance(broker)  # a second (racing) pass moves nothing twice
    [message] = _queued(broker)
    assert message.options[REDELIVERIES] == 1 and list(message.args) == [1]
    _take_as_dead_worker(broker, "dead-2")
    dramatiq_redis.run_maintenance(broker)
    [message] = _queued(broker)
    assert message.options[REDELIVERIES] == 2
    beating = broker.client.zrange(f"{broker.namespace}:__heartbeats__", 0, -1)
    assert not {b"dead-1", b"dead-2"} & set(beating)  # Dramatiq's pass forgot the dead workers


def test_dramatiqs_own_random_maintenance_is_off(broker):
    assert broker.maintenance_chance == 0  # it would requeue without the mark


def test_a_first_delivery_makes_no_redis_call(broker, monkeypatch):
    probe = _declare(broker)
    guard = redelivery.CrashGuard()

    def no_redis():
        raise AssertionError("CrashGuard talked to Redis for a first delivery")

    monkeypatch.setattr(redelivery, "get_redis", no_redis)
    message = MessageProxy(probe.message(1))
    guard.before_process_message(broker, message)
    guard.after_process_message(broker, message)


def test_a_redelivered_message_is_dead_lettered_after_max_crashes(broker):
    probe = _declare(broker)
    guard = redelivery.CrashGuard()
    message = probe.message(1).copy(options={REDELIVERIES: 1})
    # Each start that never comes back (the worker dies inside the job): no after-hook runs.
    for _ in range(redelivery.MAX_CRASHES - 1):
        guard.before_process_message(broker, MessageProxy(message))
    proxy = MessageProxy(message)
    with pytest.raises(SkipMessage):
        guard.before_process_message(broker, proxy)
    assert proxy.failed
    assert proxy.options["dead_letter_reason"].startswith(f"killed its worker {redelivery.MAX_CRASHES} times")


def test_a_redelivered_message_that_finishes_starts_its_count_again(broker):
    probe = _declare(broker)
    guard = redelivery.CrashGuard()
    message = probe.message(1).copy(options={REDELIVERIES: 1})
    for _ in range(redelivery.MAX_CRASHES + 2):  # finished each time (success or an exception)
        proxy = MessageProxy(message)
        guard.before_process_message(broker, proxy)
        guard.after_process_message(broker, proxy, exception=RuntimeError("boom"))
        assert not proxy.failed
