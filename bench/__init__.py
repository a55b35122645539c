"""Benchmarks (`make bench` → `python -m bench`). Each module has `main(argv) -> int`."""

BENCHMARKS = {
    "aisp": ("bench.aisp_refresh", "AISP refresh throughput: accounts/s against the sandbox at 100 ms latency"),
    "fanout": ("bench.fanout", "AISP fan-out for 1 M accounts: outbox rows, relay to Redis, Redis memory"),
    "report": ("bench.report", "everything above in one run: table, docs/benchmarks.md, docs/benchmarks.png"),
    "relay_memory": ("bench.relay_memory", "relay RSS before/peak/after relaying rows at the 2 MiB size limit"),
    "middleware": ("bench.middleware_cost", "per-message cost of each worker middleware (µs), and of calling them"),
    "deployed": ("bench.deployed", "issue 15: deployed KYC bursts (2,000, 20,000) vs no-op, Celery, no Sentry, no "
                 "chunks; latency at 25/75 % of capacity; interleaved rounds"),
    "kyc": ("bench.kyc", "KYC webhooks vs the Dramatiq no-op limit and vs Celery; latency, soak, profile"),
    "polls": ("bench.polls", "issue 15 item 6: payment polls, sync path before vs async chunks, rounds; AISP beside"),
    "console": ("bench.console", "console page render times (overview, dead-letter search, jobs), 100k outbox rows"),
}
