"""Issue 15's figures in one run, interleaved rounds, with a CPU calibration line:

    python -m bench deployed [--rounds 3] [--jobs 2000] [--big-jobs 20000] [--noop-jobs 8000]
                             [--latency-s 15] [--quick] [--json out.json]

Each round runs, in this order: plain Dramatiq no-op; the no-op through drop-worker's stack;
KYC bursts through job_outbox in the deployed configuration (bench.kyc.start_deployed: the
Procfile's processes, INFO logging, metrics, monitor + scheduler, Sentry at 10 % to a local
receiver) of 2,000 and of 20,000 webhooks; the 20,000 burst without Sentry; the 2,000 burst
without chunks (one message per row, as before); Celery running the same per-webhook handler deployed alike
(workers running, INFO logging, Sentry, one task sent per webhook) and stripped (preloaded,
WARNING, no Sentry: the most favourable setup for Celery). Ratios are taken within each round
and reported as min / median / max over the rounds, beside the absolutes.

Then the latency rounds (item 3): the steady capacity of the deployed configuration when every
webhook is its own INSERT (producers unthrottled), then enqueue → effect committed at 25 % and
at 75 % of that capacity, interleaved, `--rounds` times.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.middleware_cost import calibration

RATIOS = {
    "dnoop / noop (goal ≥ 0.85)": ("dnoop", "noop"),
    "KYC burst deployed / noop (goal ≥ 0.6)": ("kyc", "noop"),
    "KYC big burst deployed / noop (goal ≥ 0.6)": ("kyc_big", "noop"),
    "KYC deployed / Celery deployed alike, bursts (goal ≥ 3)": ("kyc", "celery_deployed"),
    "KYC deployed burst / Celery stripped, preloaded steady (goal ≥ 3)": ("kyc", "celery"),
    "KYC with Sentry / without, big bursts (goal ≥ 0.9)": ("kyc_big", "kyc_nosentry"),
    "KYC chunks / one message per row, bursts": ("kyc", "kyc_nochunks"),
}
# The rate each figure is compared by: bursts end to end (insert → last effect committed); the
# no-ops and the preloaded Celery run by their steady rate (10 % → 90 % done).
RATE_FIELD = {"noop": "per_s", "dnoop": "per_s", "celery": "per_s"}
RUNS = ("noop", "dnoop", "kyc", "kyc_big", "kyc_nosentry", "kyc_nochunks", "celery_deployed", "celery")


def spread(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    return f"{min(values):,.{digits}f} / {statistics.median(values):,.{digits}f} / {max(values):,.{digits}f}"


def rate(figures: dict[str, Any], key: str) -> float:
    value = figures.get(key, {}).get(RATE_FIELD.get(key, "burst_per_s"))
    return float(value) if isinstance(value, int | float) and value == value else float("nan")


def ratios(rounds: list[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for label, (a, b) in RATIOS.items():
        pairs = [(rate(f, a), rate(f, b)) for f in rounds]
        out[label] = [x / y for x, y in pairs if y and x == x and y == y]
    return out


def run_rounds(n_rounds: int, jobs: int, big_jobs: int, noop_jobs: int) -> list[dict[str, Any]]:
    from bench import kyc

    rounds: list[dict[str, Any]] = []
    for r in range(n_rounds):
        cal = calibration()
        print(f"round {r + 1}/{n_rounds}: calibration {cal} ns/loop", flush=True)
        figures: dict[str, Any] = {"calibration_ns_per_loop": cal}
        steps = {
            "noop": lambda: kyc.run_noop_raw(noop_jobs),
            "dnoop": lambda: kyc.run_noop_drop(noop_jobs),
            "kyc": lambda: kyc.run_kyc_deployed(jobs),
            "celery_deployed": lambda: kyc.run_kyc_celery_burst(jobs),
            "kyc_big": lambda: kyc.run_kyc_deployed(big_jobs, timeout_s=600),
            "kyc_nosentry": lambda: kyc.run_kyc_deployed(big_jobs, sentry=False, timeout_s=600),
            "kyc_nochunks": lambda: kyc.run_kyc_deployed(jobs, chunks=False),
            "celery": lambda: kyc.run_kyc_celery(jobs),
        }
        for key, step in steps.items():
            try:
                figures[key] = step()
            except Exception as error:  # one broken run must not lose the round
                import traceback

                traceback.print_exc()
                figures[key] = {"error": f"{type(error).__name__}: {error}"}
        figures["calibration_end_ns_per_loop"] = calibration()
        rounds.append(figures)
    return rounds


def run_latency_rounds(n_rounds: int, seconds: float) -> dict[str, Any]:
    """Capacity (unthrottled single-row inserts), then 25 % and 75 % of it, interleaved; the
    offered rates of each round come from that round's capacity."""
    from bench import kyc

    out: dict[str, Any] = {"capacity": [], "p25": [], "p75": []}
    for r in range(n_rounds):
        print(f"latency round {r + 1}/{n_rounds}", flush=True)
        cap = kyc.run_latency(0, seconds, producers=16)
        out["capacity"].append(cap)
        capacity = float(cap.get("completed_per_s") or 0) or 400.0
        for key, share in (("p25", 0.25), ("p75", 0.75)):
            out[key].append(kyc.run_latency(round(share * capacity, 1), seconds) | {"share": share,
                                                                                   "capacity_per_s": capacity})
    return out


def summarise(rounds: list[dict[str, Any]], latency: dict[str, Any] | None) -> list[str]:
    lines = ["figure (min / median / max over rounds)"]
    for label, values in ratios(rounds).items():
        lines.append(f"  {label:66} {spread(values)}")
    for key in RUNS:
        lines.append(f"  {key:16} jobs/s {spread([rate(f, key) for f in rounds], 0)}"
                     + (f" (steady 10–90 %: {spread([f[key].get('per_s', float('nan')) for f in rounds], 0)})"
                        if RATE_FIELD.get(key) is None else ""))
    lines.append(f"  calibration ns/loop {spread([f['calibration_ns_per_loop'] for f in rounds], 1)}")
    if latency:
        for key in ("capacity", "p25", "p75"):
            runs = latency.get(key) or []
            lines.append(f"  latency {key}: offered {spread([x.get('offered_per_s', float('nan')) for x in runs], 0)}"
                         f"/s, p50 {spread([x.get('p50_ms', float('nan')) for x in runs], 1)} ms, "
                         f"p99 {spread([x.get('p99_ms', float('nan')) for x in runs], 1)} ms")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench deployed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--big-jobs", type=int, default=20_000)
    parser.add_argument("--noop-jobs", type=int, default=8000)
    parser.add_argument("--latency-s", type=float, default=15)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 5,000-webhook big burst, 6 s latency runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.big_jobs, args.latency_s = min(args.rounds, 2), min(args.big_jobs, 5000), 6
    from bench.harness import ensure_servers, machine

    embedded = ensure_servers()
    import jobs.app  # noqa: F401  (the composition root, before any benchmark points it at a namespace)

    try:
        rounds = run_rounds(args.rounds, args.jobs, args.big_jobs, args.noop_jobs)
        latency = run_latency_rounds(args.rounds, args.latency_s)
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
    print()
    print("\n".join(summarise(rounds, latency)))
    if args.json:
        summary = {"machine": machine(), "rounds": rounds, "latency": latency, "ratios": ratios(rounds)}
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
