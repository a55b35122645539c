"""Relay memory with rows at the size limit: RSS before, at peak and after relaying them.

    python -m bench relay_memory [--rows 40]

The relay runs in this process exactly as the relay fork runs it (`worker.relay.drain`, real
PostgreSQL and Redis, the 16 MiB byte budget per batch). Rows are 2 MiB each (the CHECK on
`job_outbox`); the figure to watch is RSS after the drain compared with before it.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time

import psutil

from bench.harness import Sandboxed, ensure_servers


def run(rows: int) -> dict[str, float]:
    import jobs.app
    from worker.relay import drain

    with Sandboxed("relaymem"):
        pad = "m" * (2 * 1024 * 1024 - 40)
        for i in range(rows):
            jobs.enqueue("housekeeping.prune", {"pad": pad}, idempotency_key=f"big-{i}")
        del pad
        gc.collect()
        me = psutil.Process()
        before = me.memory_info().rss
        peak = before
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, me.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        sent = drain()
        took = time.perf_counter() - started
        stop.set()
        sampler.join()
        gc.collect()
        after = me.memory_info().rss
        jobs.app.broker.flush_all()
    mib = 1024 * 1024
    return {"rows": rows, "sent": sent, "payload_mib": rows * 2, "seconds": round(took, 2),
            "rss_before_mib": round(before / mib, 1), "rss_peak_mib": round(peak / mib, 1),
            "rss_after_mib": round(after / mib, 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench relay_memory")
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args(argv)
    servers = ensure_servers()
    try:
        figures = run(args.rows)
    finally:
        if servers is not None:
            servers.stop()  # type: ignore[attr-defined]
    print("relay memory:", figures)
    return 0
