"""AISP fan-out at scale (point 6): enqueue one slot's refreshes for N accounts (default 1 M).

    python -m bench fanout [--accounts 1000000] [--quick]

What actually happens in production, measured step by step on the real servers:

1. `jobs.aisp_batch.fan_out(slot)` — the scheduler's job: `INSERT … SELECT` into `job_outbox` in keyset
   chunks. This is the enqueue: PostgreSQL holds the (delayed) work from here on.
2. The relay (`worker.relay.drain`, the code the relay fork runs) moving every row to Redis, as
   if all were due at once (spread 0: the worst case; with the default one-hour spread the
   relay moves 1/3600 of them per second). The old one-round-trip-per-message enqueue is timed
   on a sample of the same rows for comparison.
3. Redis memory held by the queued messages (`MEMORY USAGE` of the queue's keys), and rows
   and messages counted on both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis

from bench.harness import Sandboxed, ensure_servers

GOAL_S = 60.0


def _seed_accounts(sb: Sandboxed, n: int) -> float:
    t0 = time.perf_counter()
    sb.sql("INSERT INTO users (id) SELECT 'u' || g FROM generate_series(1, %s) g", (max(n // 2, 1),))
    sb.sql("""INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id)
              SELECT 'ba_' || lpad(g::text, 8, '0'), 'u' || (1 + g %% %s), 'acc_' || g, 'consent_' || g
                FROM generate_series(1, %s) g""", (max(n // 2, 1), n))
    sb.sql("ANALYZE bank_accounts")
    return time.perf_counter() - t0


def _queued(client: redis.Redis, namespace: str) -> tuple[int, int]:
    """(messages, bytes) in this namespace's Dramatiq queues (hash of bodies + list of ids)."""
    messages = used = 0
    for key in client.scan_iter(match=f"{namespace}-dramatiq:*", count=1000):
        name = key.decode()
        kind = client.type(key).decode()
        if name.endswith(".msgs") and kind == "hash":
            messages += client.hlen(key)
        used += client.memory_usage(key, samples=0) or 0
    return messages, used


def run(accounts: int, sample: int) -> dict[str, Any]:
    import jobs.app
    from jobs import aisp, aisp_batch
    from worker import dramatiq_redis
    from worker import relay as outbox

    with Sandboxed("fanout") as sb:
        seed_s = _seed_accounts(sb, accounts)
        print(f"  fan-out: {accounts} accounts seeded in {seed_s:.1f} s", flush=True)
        client = redis.Redis.from_url(sb.redis_url)
        slot = aisp.clock().replace(microsecond=0) - timedelta(hours=1)

        # 1. The fan-out itself (spread 0 so that every row is due now for step 2).
        t0 = time.perf_counter()
        enqueued = aisp_batch.fan_out(slot, spread_s=0)
        fanout_s = time.perf_counter() - t0
        rows = sb.sql("SELECT count(*) FROM job_outbox")[0][0]
        print(f"  fan-out: {enqueued} refreshes as {rows} outbox rows in {fanout_s:.1f} s", flush=True)

        # 2a. The old relay path on a sample: one Redis round trip per message.
        # (the relay sends through worker.dramatiq_redis.enqueue_many: replaced there for the sample)
        pipelined = dramatiq_redis.enqueue_many
        dramatiq_redis.enqueue_many = lambda broker, messages: [broker.enqueue(m) for m in messages]  # type: ignore
        try:
            t0 = time.perf_counter()
            old_sent = 0
            # At most half the rows, so that the current path has the other half to show its rate.
            while old_sent < min(sample, rows // 2):
                result = outbox.relay_once(min(outbox.BATCH_SIZE, max(rows // 2 - old_sent, 1)))
                old_sent += result.sent
                if result.sent == 0:
                    break
            old_s = time.perf_counter() - t0
        finally:
            dramatiq_redis.enqueue_many = pipelined  # type: ignore[assignment]
        print(f"  relay, one round trip per message: {old_sent} rows in {old_s:.1f} s "
              f"({old_sent / old_s:.0f}/s)", flush=True)

        # 2b. The relay as it runs now (pipelined), for everything that is left.
        t0 = time.perf_counter()
        new_sent = outbox.drain()
        new_s = time.perf_counter() - t0
        print(f"  relay, pipelined: {new_sent} rows in {new_s:.1f} s ({new_sent / max(new_s, 1e-9):.0f}/s)",
              flush=True)

        # 3. What reached Redis, and what it costs there.
        messages, used = _queued(client, sb.namespace)
        relayed = sb.sql("SELECT count(*) FROM job_outbox WHERE relayed_at IS NOT NULL")[0][0]
        client.close()
        jobs.app.broker.client.connection_pool.disconnect()
        old_rate = old_sent / old_s if old_s else float("nan")
        new_rate = new_sent / new_s if new_s else float("nan")
        figures = {
            "accounts": accounts, "refreshes_enqueued": enqueued, "outbox_rows": rows,
            "seed_s": round(seed_s, 1), "fanout_s": round(fanout_s, 2),
            "fanout_accounts_per_s": round(enqueued / fanout_s) if fanout_s else None,
            "relay_old_rows": old_sent, "relay_old_s": round(old_s, 2),
            "relay_old_per_s": round(old_rate),
            "relay_new_rows": new_sent, "relay_new_s": round(new_s, 2),
            "relay_new_per_s": round(new_rate),
            # Every row into Redis at the old and at the current rate.
            "relay_all_old_s_est": round(rows / old_rate, 1),
            "relay_all_new_s_est": round(rows / new_rate, 1),
            "relayed_rows": relayed, "redis_messages": messages,
            "redis_bytes": used, "redis_bytes_per_message": round(used / messages) if messages else None,
            "enqueue_to_redis_s": round(fanout_s + rows / new_rate, 1),
            "goal_s": GOAL_S,
        }
        ok = relayed == rows == messages
        print(f"  fan-out {accounts} accounts: {fanout_s:.1f} s into PostgreSQL; everything in Redis after "
              f"{figures['enqueue_to_redis_s']} s (pipelined relay); Redis {used / 2**20:.0f} MiB for {messages} "
              f"messages; rows = relayed = messages: {ok}", flush=True)
        return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=50_000, help="rows relayed the old way, for comparison")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.accounts, args.sample = min(args.accounts, 100_000), min(args.sample, 10_000)
    embedded = ensure_servers()
    import jobs.app  # noqa: F401  (the composition root, before any benchmark points it at a namespace)

    try:
        figures = run(args.accounts, args.sample)
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["relayed_rows"] == figures["outbox_rows"] == figures["redis_messages"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
