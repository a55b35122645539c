"""Benchmarks (`make bench` → `python -m bench`). Each module has `main(argv) -> int`."""

BENCHMARKS = {
    "aisp": ("bench.aisp_refresh", "AISP refresh throughput: accounts/s against the sandbox at 100 ms latency"),
}
