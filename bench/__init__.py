"""Benchmarks (`make bench` → `python -m bench`). Each module has `main(argv) -> int`."""

BENCHMARKS = {
    "aisp": ("bench.aisp_refresh", "AISP refresh throughput: accounts/s against the sandbox at 100 ms latency"),
    "kyc": ("bench.kyc", "KYC webhooks vs the Dramatiq no-op limit and vs Celery; latency, soak, profile"),
}
