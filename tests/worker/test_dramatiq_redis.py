"""worker.dramatiq_redis relies on Dramatiq's Redis internals; these fail loudly when an upgrade
changes them (the dispatch script's ARGV, the key layout, the broker attributes it reads)."""

from __future__ import annotations

import re
from pathlib import Path

import dramatiq
import dramatiq.brokers.redis as redis_broker_module

from tests.conftest import wait_for
from worker import dramatiq_redis

DISPATCH = Path(redis_broker_module.__file__).parent / "redis" / "dispatch.lua"


def test_dispatch_script_takes_the_argv_the_adapter_sends():
    source = DISPATCH.read_text()
    documented = re.search(r"--\s+args=\[([^\]]*)\]", source)
    assert documented is not None, "dispatch.lua no longer documents its ARGV"
    names = [a.strip() for a in documented.group(1).split(",") if a.strip() and a.strip() != "..."]
    assert tuple(names) == dramatiq_redis.DISPATCH_ARGV
    for i, name in enumerate(dramatiq_redis.DISPATCH_ARGV, start=1):
        assert re.search(rf"local {name} = ARGV\[{i}\]", source), f"ARGV[{i}] is no longer {name}"
    for layout in ('":__heartbeats__"', '".msgs"', '".XQ"', 'queue_name, -3) == ".DQ"'):
        assert layout in source, f"dispatch.lua's key layout changed ({layout})"


def test_broker_has_the_attributes_the_adapter_reads(broker):
    for attribute in ("client", "namespace", "scripts", "broker_id", "heartbeat_timeout", "dead_message_ttl"):
        assert hasattr(broker, attribute), attribute
    assert "dispatch" in broker.scripts and callable(broker._max_unpack_size)


def test_keys_counts_and_batch_enqueue_match_a_real_broker(broker, db, redis_namespace, request):
    seen: list[int] = []

    @dramatiq.actor(actor_name="test.adapter_probe", queue_name="adapter", broker=broker)
    def probe(n: int) -> None:
        seen.append(n)

    client = broker.client
    ns = broker.namespace
    assert ns == f"{redis_namespace}-dramatiq"
    client.delete(f"{ns}:__heartbeats__")  # the fixture's flush left this broker's heartbeat
    dramatiq_redis.enqueue_many(broker, [probe.message(n) for n in range(5)])
    assert dramatiq_redis.workers_alive(client, ns) == 0  # the relay's enqueue is not a worker
    assert client.llen(f"{ns}:adapter") == 5 and client.hlen(f"{ns}:adapter.msgs") == 5
    assert "adapter" in dramatiq_redis.declared_queues()  # declared on this process's broker
    stats = {q["queue"]: q for q in dramatiq_redis.queue_stats(client, ns, ["adapter"])}
    assert stats["adapter"]["ready"] == 5 and stats["adapter"]["delayed"] == 0
    assert dramatiq_redis.queue_oldest_age(client, ns, ["adapter"])["adapter"] >= 0.0
    request.getfixturevalue("worker")  # now a worker consumes them
    wait_for(lambda: sorted(seen) == [0, 1, 2, 3, 4], what="the batch-enqueued messages to run")
    assert dramatiq_redis.workers_alive(client, ns) >= 1
    dramatiq_redis.run_maintenance(broker)  # Dramatiq's own maintenance accepts the adapter's ARGV
    assert dramatiq_redis.workers_alive(client, ns) >= 1  # the maintenance id is not counted
