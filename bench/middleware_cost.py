"""What each middleware of the worker's stack costs per message, in one process (no queue, no pool).

    python -m bench middleware [--messages 20000] [--json out.json]

For every middleware of `worker.broker.build_broker()` (the deployed stack, Prometheus included)
its own hooks for one message's life — before/after process_message, before/after ack — are
timed directly, a first delivery of a no-op message that succeeded. Then the whole stack as
Dramatiq calls it: `emit_before/after` of those signals through Dramatiq's Broker (every
middleware, no-op hooks included) and through drop-worker's broker (only those that handle the
signal). µs per message; the pool figures (bench.kyc's no-op runs) give the end-to-end ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

SIGNALS = (("before", "process_message"), ("after", "process_message"), ("before", "ack"), ("after", "ack"))


def _lifecycle(broker: Any, middleware: Any, proxy: Any) -> None:
    for when, signal in SIGNALS:
        hook = getattr(middleware, f"{when}_{signal}")
        if signal == "process_message" and when == "after":
            hook(broker, proxy, result=None)
        else:
            hook(broker, proxy)


def measure(n: int) -> dict[str, Any]:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="drop-bench-prom-"))
    os.environ.setdefault("dramatiq_prom_db", os.environ["PROMETHEUS_MULTIPROC_DIR"])
    import dramatiq
    from dramatiq.broker import Broker, MessageProxy

    from worker.broker import build_broker

    broker = build_broker(metrics=True)

    @dramatiq.actor(actor_name="bench.cost_noop", queue_name="bench", broker=broker)
    def noop() -> None:
        pass

    for m in broker.middleware:
        if type(m).__name__ == "Prometheus":
            m.after_process_boot(broker)  # creates its metric families

    def message() -> Any:
        return MessageProxy(dramatiq.Message(queue_name="bench", actor_name="bench.cost_noop", args=(), kwargs={},
                                             options={"request_id": "bench", "redis_message_id": "x"}))

    per_middleware: dict[str, float] = {}
    for m in broker.middleware:
        proxies = [message() for _ in range(n)]
        _lifecycle(broker, m, proxies[0])  # warm (scripts registered, metrics created)
        started = time.perf_counter()
        for proxy in proxies:
            _lifecycle(broker, m, proxy)
        per_middleware[type(m).__name__] = round((time.perf_counter() - started) / n * 1e6, 2)

    def through(emit_owner: Any) -> float:
        proxies = [message() for _ in range(n)]
        started = time.perf_counter()
        for proxy in proxies:
            for when, signal in SIGNALS:
                emit = getattr(emit_owner, f"emit_{when}")
                if signal == "process_message" and when == "after":
                    emit(broker, signal, proxy, result=None) if emit_owner is Broker else emit(signal, proxy,
                                                                                                result=None)
                else:
                    emit(broker, signal, proxy) if emit_owner is Broker else emit(signal, proxy)
        return round((time.perf_counter() - started) / n * 1e6, 2)

    stack_dramatiq = through(Broker)
    stack_drop = through(broker)
    own = sum(per_middleware.values())
    return {"messages": n, "us_per_message": per_middleware, "hooks_total_us": round(own, 2),
            "stack_via_dramatiq_emit_us": stack_dramatiq, "stack_via_drop_emit_us": stack_drop,
            "dispatch_saved_us": round(stack_dramatiq - stack_drop, 2)}


def calibration(loops: int = 2_000_000) -> float:
    """ns per iteration of a fixed pure-Python loop: how fast this machine is right now."""
    started = time.perf_counter()
    total = 0
    for i in range(loops):
        total += i & 7
    return round((time.perf_counter() - started) / loops * 1e9, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench middleware", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from bench.harness import ensure_servers

    embedded = ensure_servers()
    try:
        figures = measure(args.messages) | {"calibration_ns_per_loop": calibration()}
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
    for name, us in sorted(figures["us_per_message"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:24} {us:7.2f} µs/message")
    print(f"  hooks in all {figures['hooks_total_us']} µs; whole stack via Dramatiq's emit "
          f"{figures['stack_via_dramatiq_emit_us']} µs, via drop-worker's {figures['stack_via_drop_emit_us']} µs; "
          f"calibration {figures['calibration_ns_per_loop']} ns/loop")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
