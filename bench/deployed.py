"""Issue 15's figures in one run, interleaved rounds, with a CPU calibration line:

    python -m bench deployed [--rounds 3] [--jobs 2000] [--noop-jobs 8000] [--json out.json]

Each round runs, in this order: plain Dramatiq no-op; the no-op through drop-worker's stack;
a KYC burst through job_outbox in the deployed configuration (bench.kyc.run_kyc_deployed:
Procfile processes, INFO logging, metrics, monitor + scheduler, Sentry at 10 % to a local
receiver), the same without Sentry, the same without chunks (one message per row, as before);
Celery running the same per-webhook handler (preloaded). Ratios are taken within each round and
reported as min / median / max over the rounds, beside the absolutes.
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
    "KYC deployed / noop (goal ≥ 0.6)": ("kyc", "noop"),
    "KYC deployed / Celery same handler (goal ≥ 3)": ("kyc", "celery"),
    "KYC with Sentry / without (goal ≥ 0.9)": ("kyc", "kyc_nosentry"),
    "KYC chunks / one message per row": ("kyc", "kyc_nochunks"),
}


def spread(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench deployed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--noop-jobs", type=int, default=8000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from bench.harness import ensure_servers, machine

    embedded = ensure_servers()
    import jobs.app  # noqa: F401  (the composition root, before any benchmark points it at a namespace)
    from bench import kyc

    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: calibration {calibration()} ns/loop", flush=True)
            figures = {
                "calibration_ns_per_loop": calibration(),
                "noop": kyc.run_noop_raw(args.noop_jobs),
                "dnoop": kyc.run_noop_drop(args.noop_jobs),
                "kyc": kyc.run_kyc_deployed(args.jobs),
                "kyc_nosentry": kyc.run_kyc_deployed(args.jobs, sentry=False),
                "kyc_nochunks": kyc.run_kyc_deployed(args.jobs, chunks=False),
                "celery": kyc.run_kyc_celery(args.jobs),
            }
            rounds.append(figures)
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
    print("\nfigure (min / median / max over rounds)")
    summary: dict[str, Any] = {"machine": machine(), "rounds": rounds, "ratios": {}}
    for label, (a, b) in RATIOS.items():
        ratios = [f[a]["per_s"] / f[b]["per_s"] for f in rounds if f[b]["per_s"]]
        summary["ratios"][label] = ratios
        print(f"  {label:48} {spread(ratios)}")
    for key in ("noop", "dnoop", "kyc", "kyc_nosentry", "kyc_nochunks", "celery"):
        print(f"  {key:14} jobs/s {spread([f[key]['per_s'] for f in rounds])}"
              + (f"; burst insert→last effect {spread([f[key]['burst_per_s'] for f in rounds])}/s"
                 if "burst_per_s" in rounds[0][key] else ""))
    print(f"  calibration ns/loop {spread([f['calibration_ns_per_loop'] for f in rounds])}")
    for key in ("kyc", "kyc_nochunks"):
        print(f"  CPU ms per job ({key}): {[f[key].get('cpu_ms_per_job') for f in rounds]}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
