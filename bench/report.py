"""The whole benchmark in one run, the deployed configuration first: every figure as a ratio
taken within this run (min / median / max of interleaved rounds), absolutes beside it, a CPU
calibration line, CPU per job by process kind, the configuration of every row; a table on stdout,
`docs/benchmarks.md` (between its report markers), `docs/benchmarks.png`, `docs/benchmarks.json`.

    python -m bench report [--quick] [--rounds 3] [--soak-jobs 1000000] [--no-docs] [--from-json run.json]

`make bench` runs this: about 25–30 minutes on 2 cores (the 1,000,000-job soak about a third of
it). `--quick` is a development pass (2 rounds, small N, a 20,000-job soak: ~6 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.harness import PROCESSES, ROOT, THREADS, Sandboxed, ensure_servers, machine

DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks.png"
START, END = "<!-- bench:report:start -->", "<!-- bench:report:end -->"
GOALS = {"kyc_vs_noop": 0.60, "vs_celery": 3.0, "p99_25_ms": 50.0, "p99_75_ms": 150.0, "dnoop": 0.85,
         "sentry": 0.90, "soak_dev": 0.05, "aisp_per_s": 1000, "quota": 4, "fanout_s": 60.0}
NAN = float("nan")


# --- AISP quota: unattended reads per account (point 5, second half) -------------------------


def run_quota(accounts: int = 200, slots: int = 6) -> dict[str, Any]:
    """Six slots' fan-outs within 24 h, all due at once, raced by the real worker pool against the
    sandbox: the ledger and the sandbox must both show at most 4 unattended reads per account."""
    from bench.aisp_refresh import CREDS
    from bench.aisp_refresh import Sandbox as SandboxServer
    from jobs import aisp, aisp_batch
    from sandbox.admin import SandboxAdmin

    with Sandboxed("quota") as sb:
        sb.sql("INSERT INTO users (id) VALUES ('quota-user')")
        sb.sql("""INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id)
                  SELECT 'ba_' || g, 'quota-user', 'acc_' || g, 'consent_' || g FROM generate_series(1, %s) g""",
               (accounts,))
        server = SandboxServer({**sb.env, **CREDS})
        try:
            admin = SandboxAdmin(server.url)
            admin.reset(client_id=CREDS["NEONOMICS_CLIENT_ID"], client_secret=CREDS["NEONOMICS_CLIENT_SECRET"])
            now = aisp.clock().replace(microsecond=0)
            for k in range(slots):  # slots 5 h, 4 h, … 0 h ago: all inside one rolling 24 h
                aisp_batch.fan_out(now - timedelta(hours=slots - 1 - k), spread_s=0)
            pool = sb.start_drop_pool(["aisp"], threads=16, NEONOMICS_API_URL=server.url, **CREDS)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and pool.poll() is None:
                left = sb.sql("SELECT count(*) FROM job_outbox WHERE done_at IS NULL AND error IS NULL")[0][0]
                if left == 0:
                    break
                time.sleep(0.5)
            per_account = sb.sql("""SELECT count(*) FROM aisp_reads WHERE initiated_by = 'scheduler'
                                      AND requested_at > now() - interval '24 hours' GROUP BY bank_account_id""")
            counts = [r[0] for r in per_account]
            requests = admin.count("neonomics.balances")
            admin.close()
        finally:
            server.stop()
        figures = {"accounts": accounts, "slots": slots, "max_reads_per_account": max(counts, default=0),
                   "min_reads_per_account": min(counts, default=0), "sandbox_requests": requests,
                   "outbox_left": left}
        print(f"  quota: {slots} slots × {accounts} accounts → max {figures['max_reads_per_account']} unattended "
              f"reads per account (sandbox saw {requests} = {requests / accounts:.2f}/account)", flush=True)
        return figures


def run_aisp(accounts: int) -> dict[str, Any]:
    """Point 5: the AISP engineer's benchmark (bench/aisp_refresh.py), figures read from its JSON."""
    from bench import aisp_refresh

    out = Path(tempfile.mkdtemp(prefix="drop-bench-")) / "aisp.json"
    status = aisp_refresh.main(["--accounts", str(accounts), "--json", str(out)])
    figures = json.loads(out.read_text()) if out.exists() else {}
    figures["status"] = status
    return figures


def run_middleware(messages: int) -> dict[str, Any]:
    """bench.middleware_cost in its own process (it builds a broker and sets Prometheus' env)."""
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="drop-bench-")) / "middleware.json"
    subprocess.run([sys.executable, "-m", "bench", "middleware", "--messages", str(messages), "--json", str(out)],
                   cwd=ROOT, check=True)
    return dict(json.loads(out.read_text()))


# --- the run ---------------------------------------------------------------------------------


def _step(results: dict[str, Any], key: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {key} …", flush=True)
    started = time.perf_counter()
    try:
        results[key] = fn(*args, **kwargs)
    except Exception as error:  # one broken step must not lose the others' figures
        import traceback

        traceback.print_exc()
        results[key] = {"error": f"{type(error).__name__}: {error}"}
    results.setdefault("_durations", {})[key] = round(time.perf_counter() - started, 1)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from bench import deployed, fanout, kyc

    quick = args.quick
    rounds = args.rounds or (2 if quick else 3)
    n_kyc, n_big, n_noop = (2000, 5000, 8000) if quick else (2000, 20_000, 8000)
    soak_jobs = args.soak_jobs or (20_000 if quick else 1_000_000)
    results: dict[str, Any] = {"machine": machine(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
                               "quick": quick, "shape": f"{PROCESSES} processes × {THREADS} threads",
                               "sizes": {"burst": n_kyc, "big_burst": n_big, "noop": n_noop, "rounds": rounds}}
    # The deployed configuration first: its rounds are the headline.
    _step(results, "deployed", deployed.run_rounds, rounds, n_kyc, n_big, n_noop)
    _step(results, "latency", deployed.run_latency_rounds, rounds, 6 if quick else 15)
    _step(results, "middleware", run_middleware, 20_000)
    # Beside it, the stripped setup of the earlier reports (preloaded messages, one per row, bare pool).
    _step(results, "stripped", kyc.run_kyc_drop, 4000 if quick else 10_000)
    if shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists():
        _step(results, "profile", kyc.run_kyc_drop, 3000 if quick else 8000, profile_s=6 if quick else 10)
    else:  # not in the bench extras (a native binary): `pip install py-spy` for the profile row
        results["profile"] = {"skipped": "py-spy not installed"}
    _step(results, "aisp", run_aisp, 4000 if quick else 20_000)
    _step(results, "quota", run_quota, 50 if quick else 200)
    _step(results, "fanout", fanout.run, 100_000 if quick else 1_000_000, 10_000 if quick else 50_000)
    _step(results, "soak", kyc.run_soak, soak_jobs, timeout_s=1800)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["load_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return results


# --- figures and text ------------------------------------------------------------------------

# The configuration of every row (the table's second column), spelled once.
CONFIG = {
    "deployed": "**deployed**: Procfile processes (pool 2 × 8 + relay fork, metrics on, scheduler, monitor), INFO, "
                "Sentry 10 % to a local receiver, rows inserted into job_outbox",
    "deployed_nosentry": "deployed, SENTRY_DSN unset",
    "deployed_nochunks": "deployed, relay sends one message per row (bench.no_chunks)",
    "noop": "stripped: plain RedisBroker, Dramatiq's default middleware, 2 × 8, messages preloaded",
    "dnoop": "drop-worker's broker and full middleware (Prometheus on), 2 × 8, preloaded, WARNING, no Sentry",
    "celery_deployed": "Celery 5, 2 processes × 8 threads running, acks_late, INFO, Sentry (Celery integration, "
                       "traces at our KYC family's 1 %, Redis integration off), one task sent per webhook",
    "celery": "stripped Celery: same workers, WARNING, no Sentry, tasks preloaded in Redis, steady 10–90 %",
    "latency": "deployed; {producers} producer connections taking turns on one schedule, one autocommit INSERT "
               "per webhook",
    "capacity": "deployed; 16 producer connections inserting one row per webhook as fast as they can",
    "stripped": "stripped: relayed messages preloaded in Redis, one per row, pool 2 × 8, WARNING, no Sentry, "
                "no scheduler/monitor",
    "soak": "deployed, rows inserted in windows of 20,000 (≤ 2 windows pending)",
}


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else NAN


def _vals(values: list[float]) -> list[float]:
    return [v for v in values if v == v]


def mmm(values: list[float], digits: int = 2, unit: str = "") -> str:
    """min / median / max"""
    values = _vals(values)
    if not values:
        return "—"
    f = f"{{:,.{digits}f}}"
    return " / ".join(f.format(v) for v in (min(values), statistics.median(values), max(values))) + unit


def median(values: list[float]) -> float:
    values = _vals(values)
    return statistics.median(values) if values else NAN


def goal_text(values: list[float], ok: Any, what: str) -> str:
    """met / missed by the median, and whether every round agrees."""
    values = _vals(values)
    if not values:
        return f"{what}: no figure"
    med, rounds_ok = ok(statistics.median(values)), [ok(v) for v in values]
    word = "met" if med else "**missed**"
    if med and not all(rounds_ok):
        word += f" (median; {rounds_ok.count(False)} of {len(values)} rounds miss)"
    elif not med and any(rounds_ok):
        word += f" (median; {rounds_ok.count(True)} of {len(values)} rounds meet)"
    return f"{what}: {word}"


def _rounds(results: dict[str, Any]) -> list[dict[str, Any]]:
    rounds = results.get("deployed")
    return rounds if isinstance(rounds, list) else []


def _cpu(figures: dict[str, Any], keys: tuple[str, ...] = ("workers", "postgres", "redis", "scheduler",
                                                          "monitor", "bench (this process)")) -> str:
    cpu = figures.get("cpu_ms_per_job") or {}
    return " / ".join(f"{cpu.get(k, 0):.2f}" for k in keys)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The per-round ratios and absolutes the table, chart and closing note are made of."""
    from bench.deployed import rate

    rounds = _rounds(results)
    per = {key: [rate(f, key) for f in rounds] for key in
           ("noop", "dnoop", "kyc", "kyc_big", "kyc_nosentry", "kyc_nochunks", "celery_deployed", "celery")}

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(per[a], per[b], strict=True) if y and x == x and y == y]

    lat = results.get("latency") if isinstance(results.get("latency"), dict) else {}
    return {"per": per, "dnoop": ratio("dnoop", "noop"), "kyc": ratio("kyc", "noop"),
            "kyc_big": ratio("kyc_big", "noop"), "vs_celery": ratio("kyc", "celery_deployed"),
            "vs_celery_stripped": ratio("kyc", "celery"), "big_vs_celery": ratio("kyc_big", "celery_deployed"),
            "sentry": ratio("kyc_big", "kyc_nosentry"), "chunks": ratio("kyc", "kyc_nochunks"),
            "calibration": [_num(f.get("calibration_ns_per_loop")) for f in rounds]
            + [_num(f.get("calibration_end_ns_per_loop")) for f in rounds],
            "capacity": [_num(x.get("completed_per_s")) for x in lat.get("capacity", [])],
            "p25": lat.get("p25", []), "p75": lat.get("p75", [])}


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of (figure, configuration, ratio min / median / max, absolutes, goal and verdict)."""
    h = headline(results)
    per, rounds, sizes = h["per"], _rounds(results), results.get("sizes", {})
    burst, big = f"{sizes.get('burst', 2000):,}", f"{sizes.get('big_burst', 20_000):,}"

    def steady(key: str) -> list[float]:
        return [_num(f.get(key, {}).get("per_s")) for f in rounds]

    rows = [
        ("CPU calibration (fixed Python loop)", "the bench process, before and after each round",
         "—", f"{mmm(h['calibration'], 1)} ns per loop", "— (the lower, the faster the machine was)"),
        ("1. limit: plain Dramatiq no-op", CONFIG["noop"], "1.00 (reference)", f"{mmm(per['noop'], 0)} jobs/s",
         "—"),
        ("no-op through drop-worker's stack (item 4)", CONFIG["dnoop"], f"{mmm(h['dnoop'])} of the limit",
         f"{mmm(per['dnoop'], 0)} jobs/s", goal_text(h["dnoop"], lambda v: v >= GOALS["dnoop"], "≥ 0.85")),
        (f"KYC burst of {burst} (item 1)", CONFIG["deployed"], f"{mmm(h['kyc'])} of the limit",
         f"{mmm(per['kyc'], 0)} /s insert → last effect committed (steady 10–90 %: {mmm(steady('kyc'), 0)})",
         goal_text(h["kyc"], lambda v: v >= GOALS["kyc_vs_noop"], "≥ 0.6")),
        (f"KYC burst of {big} (item 1)", CONFIG["deployed"], f"{mmm(h['kyc_big'])} of the limit",
         f"{mmm(per['kyc_big'], 0)} /s insert → last effect committed (steady 10–90 %: "
         f"{mmm(steady('kyc_big'), 0)})", goal_text(h["kyc_big"], lambda v: v >= GOALS["kyc_vs_noop"], "≥ 0.6")),
        (f"peer: Celery, same per-webhook handler, burst of {burst} (item 2)", CONFIG["celery_deployed"],
         f"ours / Celery = {mmm(h['vs_celery'])}×",
         f"Celery {mmm(per['celery_deployed'], 0)} /s first send → last effect (steady "
         f"{mmm(steady('celery_deployed'), 0)}); ours {big}: {mmm(h['big_vs_celery'], 1)}× Celery's",
         goal_text(h["vs_celery"], lambda v: v >= GOALS["vs_celery"], "≥ 3×")),
        ("peer, most favourable to Celery (item 2)", CONFIG["celery"],
         f"ours / Celery = {mmm(h['vs_celery_stripped'])}×",
         f"Celery {mmm(per['celery'], 0)} jobs/s steady", goal_text(h["vs_celery_stripped"],
                                                                    lambda v: v >= GOALS["vs_celery"], "≥ 3×")),
        (f"Sentry cost, burst of {big} (item 5)", f"deployed / {CONFIG['deployed_nosentry']}",
         f"with / without = {mmm(h['sentry'])}", f"without Sentry {mmm(per['kyc_nosentry'], 0)} /s",
         goal_text(h["sentry"], lambda v: v >= GOALS["sentry"], "≥ 0.9")),
        (f"chunks, burst of {burst}", f"deployed / {CONFIG['deployed_nochunks']}",
         f"chunks / one per row = {mmm(h['chunks'], 1)}×", f"one per row {mmm(per['kyc_nochunks'], 0)} /s", "—"),
    ]
    cap = results.get("latency", {}).get("capacity", []) if isinstance(results.get("latency"), dict) else []
    big_med = median(per["kyc_big"])
    rows.append(("capacity with one INSERT per webhook (item 3's 100 %)", CONFIG["capacity"],
                 f"{mmm([c / big_med for c in h['capacity']])} of the {big} burst's rate",
                 f"{mmm(h['capacity'], 0)} effects/s committed while inserting "
                 f"(CPU busy {mmm([_num(c.get('machine_cpu_busy')) * 100 for c in cap], 0)} %)", "—"))
    for key, goal, share in (("p25", GOALS["p99_25_ms"], "25 %"), ("p75", GOALS["p99_75_ms"], "75 %")):
        runs = h[key]
        p99 = [_num(x.get("p99_ms")) for x in runs]
        producers = "/".join(sorted({str(x.get("producers", 8)) for x in runs})) or "?"
        rows.append((f"latency enqueue → effect committed at {share} of capacity (item 3)",
                     CONFIG["latency"].format(producers=producers),
                     f"p99 / goal = {mmm([v / goal for v in p99])}",
                     f"offered {mmm([_num(x.get('offered_per_s')) for x in runs], 0)} /s; p50 "
                     f"{mmm([_num(x.get('p50_ms')) for x in runs], 1)} ms, p95 "
                     f"{mmm([_num(x.get('p95_ms')) for x in runs], 1)} ms, p99 {mmm(p99, 1)} ms",
                     goal_text(p99, lambda v, g=goal: v < g, f"p99 < {goal:.0f} ms")))
    mw = results.get("middleware", {})
    if mw.get("us_per_message"):
        top = sorted(mw["us_per_message"].items(), key=lambda kv: -kv[1])[:4]
        rows.append(("per-middleware cost (item 4)", "one process, no queue: each middleware's hooks for one "
                     "first delivery", f"stack via drop's emit / via Dramatiq's = "
                     f"{mw['stack_via_drop_emit_us'] / max(mw['stack_via_dramatiq_emit_us'], 1e-9):.2f}",
                     f"{mw['hooks_total_us']} µs in all; " + ", ".join(f"{k} {v}" for k, v in top) + " µs", "—"))
    stripped = results.get("stripped", {})
    rows.append(("KYC, stripped setup (the earlier reports' headline)", CONFIG["stripped"],
                 f"{_num(stripped.get('per_s')) / median(per['noop']):.2f} of the median limit",
                 f"{_num(stripped.get('per_s')):,.0f} jobs/s steady ({stripped.get('jobs')} jobs, one run)", "—"))
    aisp, quota, fan, soak = (results.get(k, {}) for k in ("aisp", "quota", "fanout", "soak"))
    aisp_rate = _num(aisp.get("steady_per_s"))
    rows += [
        ("AISP refresh, sandbox at 100 ms", "pool 2 × 8, aisp queue, relay; one run",
         f"{aisp_rate / GOALS['aisp_per_s']:.2f} of the goal",
         f"{aisp_rate:,.0f} accounts/s steady ({aisp.get('accounts')} accounts)",
         goal_text([aisp_rate], lambda v: v >= GOALS["aisp_per_s"], "≥ 1000/s")),
        ("unattended reads per account, 6 slots in 24 h", "pool 2 × 16, sandbox; one run",
         f"{quota.get('max_reads_per_account')} / 4",
         f"{quota.get('accounts')} accounts; sandbox saw {quota.get('sandbox_requests')} requests",
         goal_text([_num(quota.get("max_reads_per_account"))], lambda v: v <= GOALS["quota"], "≤ 4")),
        ("fan-out, 1 M accounts → outbox", "this process, one run",
         f"{_num(fan.get('fanout_s')) / GOALS['fanout_s']:.2f} of the 60 s budget",
         f"{fan.get('fanout_s')} s, {fan.get('refreshes_enqueued') or 0:,} refreshes in "
         f"{fan.get('outbox_rows') or 0:,} rows; all relayed in {fan.get('enqueue_to_redis_s')} s "
         f"(pipelined {fan.get('relay_new_per_s')} rows/s, one-by-one {fan.get('relay_old_per_s')})",
         goal_text([_num(fan.get("fanout_s"))], lambda v: v < GOALS["fanout_s"], "< 60 s")),
        ("soak: worker RSS (item 7)", CONFIG["soak"],
         f"max deviation after warm-up {_num(soak.get('max_dev_after_warmup')):.1%}; end / after warm-up "
         f"{_num(soak.get('rss_end_mib')) / _num(soak.get('rss_after_warmup_mib') or NAN):.3f}",
         f"{soak.get('done') or 0:,} jobs in {soak.get('elapsed_s')} s ({soak.get('per_s')} /s); "
         f"{soak.get('rss_start_mib')} → {soak.get('rss_after_warmup_mib')} (after 10 %) → {soak.get('rss_end_mib')} "
         f"MiB, {soak.get('processes')} processes; slope {soak.get('slope_kib_per_100k_jobs')} KiB per 100k jobs",
         goal_text([_num(soak.get("max_dev_after_warmup"))], lambda v: v <= GOALS["soak_dev"], "within 5 %")
         + ("" if (soak.get("done") or 0) >= 1_000_000 else f" (only {soak.get('done') or 0:,} jobs: short of 1 M)")),
    ]
    return rows


def cpu_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """CPU ms per job by process kind (min / median / max over rounds) for the main runs."""
    kinds = ("workers", "postgres", "redis", "scheduler", "monitor", "bench (this process)", "other processes")
    out = []
    for key, label in (("kyc", "KYC burst, deployed"), ("kyc_big", "KYC big burst, deployed"),
                       ("kyc_nosentry", "KYC big burst, deployed, no Sentry"),
                       ("kyc_nochunks", "KYC burst, deployed, no chunks"),
                       ("celery_deployed", "Celery burst, deployed alike"), ("celery", "Celery stripped")):
        cells = [mmm([_num((f.get(key, {}).get("cpu_ms_per_job") or {}).get(k, 0.0)) for f in _rounds(results)])
                 for k in kinds]
        out.append((label, *cells))
    for key in ("p25", "p75"):
        runs = headline(results)[key]
        cells = [mmm([_num((x.get("cpu_ms_per_job") or {}).get(k, 0.0)) for x in runs]) for k in kinds]
        out.append((f"latency run at {key[1:]} % of capacity", *cells))
    soak = results.get("soak", {}).get("cpu_ms_per_job") or {}
    out.append(("soak", *[f"{_num(soak.get(k, 0.0)):.2f}" for k in kinds]))
    return out


def print_table(rows: list[tuple[str, ...]]) -> None:
    for r in rows:
        print(f"- {r[0]}: {r[2]} | {r[3]} | {r[4]}\n    [{r[1]}]")


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = headline(results)
    per = h["per"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    keys = ["noop", "dnoop", "kyc", "kyc_big", "kyc_nosentry", "kyc_nochunks", "celery_deployed", "celery"]
    labels = ["Dramatiq\nno-op", "drop stack\nno-op", "KYC burst\ndeployed", "KYC big\nburst dep.",
              "KYC big\nno Sentry", "KYC burst\nno chunks", "Celery\ndeployed", "Celery\nstripped"]
    meds = [median(per[k]) for k in keys]
    lo = [m - min(_vals(per[k]) or [m]) for k, m in zip(keys, meds, strict=True)]
    hi = [max(_vals(per[k]) or [m]) - m for k, m in zip(keys, meds, strict=True)]
    colors = ["#999", "#bbb", "#2a7", "#196", "#6c9", "#8cb", "#c75", "#e9a"]
    bars = axes[0].bar(labels, [m if m == m else 0 for m in meds], yerr=[lo, hi], capsize=3, color=colors)
    noop = median(per["noop"])
    for bar, v in zip(bars, meds, strict=True):
        if v == v:
            axes[0].annotate(f"{v:,.0f}/s\n{v / noop:.2f}", (bar.get_x() + bar.get_width() / 2, v),
                             ha="center", va="bottom", fontsize=7)
    axes[0].axhline(0.6 * noop, ls="--", c="k", lw=0.8)
    axes[0].text(7.4, 0.6 * noop, "goal: 0.6 of no-op", ha="right", va="bottom", fontsize=8)
    axes[0].set_title("Throughput, median and min–max of the rounds (jobs/s)", fontsize=10)
    axes[0].tick_params(axis="x", labelsize=7)
    groups = [("p25", "25 %", GOALS["p99_25_ms"]), ("p75", "75 %", GOALS["p99_75_ms"])]
    for gi, (key, _, goal) in enumerate(groups):
        runs = h[key]
        for qi, q in enumerate(("p50", "p95", "p99")):
            vals = _vals([_num(x.get(f"{q}_ms")) for x in runs])
            if not vals:
                continue
            m = statistics.median(vals)
            axes[1].bar(gi * 4 + qi, m, yerr=[[m - min(vals)], [max(vals) - m]], capsize=3,
                        color=["#9bd", "#58b", "#247"][qi])
            axes[1].annotate(f"{q}\n{m:,.0f}", (gi * 4 + qi, m), ha="center", va="bottom", fontsize=7)
        axes[1].hlines(goal, gi * 4 - 0.5, gi * 4 + 2.5, linestyles="--", colors="k", lw=0.8)
    caps = _vals(h["capacity"])
    axes[1].set_xticks([1, 5], [f"{lbl} of capacity\n(p99 goal {g:.0f} ms)" for _, lbl, g in groups])
    axes[1].set_yscale("log")
    axes[1].set_title(f"Enqueue → effect committed, deployed (ms, log); capacity "
                      f"{statistics.median(caps) if caps else NAN:,.0f}/s", fontsize=10)
    soak = results.get("soak", {})
    samples = soak.get("samples") or []
    if samples:
        axes[2].plot([d for _, d, _ in samples], [r for *_, r in samples], c="#a44")
        warm = _num(soak.get("rss_after_warmup_mib"))
        if warm == warm:
            axes[2].axhspan(warm * 0.95, warm * 1.05, color="#a44", alpha=0.1, label="after warm-up ± 5 %")
            axes[2].legend(fontsize=8, loc="lower right")
    axes[2].set_title(f"Soak, deployed: worker RSS (MiB, {soak.get('processes')} processes) vs jobs done",
                      fontsize=10)
    axes[2].set_xlabel("jobs done")
    axes[2].set_ylim(bottom=0)
    m = results.get("machine", {})
    fig.suptitle(f"drop-worker benchmarks, one run {results.get('started')} — {m.get('nproc')} × {m.get('cpu')}, "
                 f"Python {m.get('python')}; calibration {mmm(h['calibration'], 1)} ns/loop", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    rows = table(results)
    m = results["machine"]
    sizes = results.get("sizes", {})
    out = [START, "", "## Report of the last full run (`make bench`, generated by `bench/report.py`)", "",
           f"Run {results['started']} → {results.get('finished')}"
           + (" (**quick mode: small N, not for quoting**)" if results.get("quick") else "") + ".", "",
           "| machine | |", "|---|---|",
           f"| CPU | {m['nproc']} × {m['cpu']} |", f"| RAM | {m['ram']} |", f"| OS | {m['os']} |",
           f"| Python | {m['python']} |", f"| packages | {m['packages']} |",
           f"| servers | PostgreSQL {m.get('postgres_server')}, Redis {m.get('redis_server')} "
           "(loopback, on the same cores) |",
           f"| load average (1, 5, 15 min) | start {m['load_at_start']}, end {results.get('load_at_end')} |",
           f"| worker shape | {results['shape']} (the Procfile's) for every queue system |",
           f"| rounds | {sizes.get('rounds')} interleaved rounds (each: no-op, drop no-op, KYC burst, Celery "
           "burst, KYC big burst, big burst without Sentry, burst without chunks, Celery stripped), then as "
           "many latency rounds (capacity, 25 %, 75 %) |", "",
           "Every ratio is taken within one round of this run and given as min / median / max over the "
           "rounds; absolutes beside it. Goals are judged on the median. Bursts are timed from the INSERT "
           "of the rows (Celery: from the first task sent) to the last effect committed.", "",
           "| figure | configuration | ratio (same run) | absolute | goal |", "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    out += ["", "![benchmarks](benchmarks.png)", "",
            "CPU milliseconds per job by process kind (min / median / max over rounds; `workers` is the "
            "pool's session: worker processes and the relay fork; `other processes` is everyone else on the "
            "machine, other engineers' runs included):", "",
            "| run | workers | PostgreSQL | Redis | scheduler | monitor | bench process | other processes |",
            "|---|---|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in cpu_rows(results)]
    out += [""]
    mw = results.get("middleware", {})
    if mw.get("us_per_message"):
        out += ["Per-middleware cost, µs per message (one first delivery's hooks): "
                + ", ".join(f"{k} {v}" for k, v in sorted(mw["us_per_message"].items(), key=lambda kv: -kv[1]))
                + f"; all hooks {mw['hooks_total_us']} µs; the stack through Dramatiq's emit "
                  f"{mw['stack_via_dramatiq_emit_us']} µs, through DropRedisBroker's "
                  f"{mw['stack_via_drop_emit_us']} µs.",
                ""]
    prof = results.get("profile", {}).get("profile", {})
    if prof.get("buckets"):
        out += ["Profile of one worker process in the stripped KYC run (py-spy `--gil`): "
                + ", ".join(f"{name} {pct} %" for name, pct in prof["buckets"]) + ".", ""]
    durations = results.get("_durations", {})
    out += ["Step durations (s): " + ", ".join(f"{k} {v}" for k, v in durations.items()), ""]
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v and k != "profile"}
    errors |= {f"round {i + 1} {k}": v["error"] for i, f in enumerate(_rounds(results)) for k, v in f.items()
               if isinstance(v, dict) and "error" in v}
    if errors:
        out += ["Steps that failed in this run: " + "; ".join(f"{k}: {v}" for k, v in errors.items()), ""]
    out += ["Raw figures: `docs/benchmarks.json`.", "", END]
    return "\n".join(out)


def write_docs(results: dict[str, Any]) -> None:
    block = markdown(results)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:  # right after the title: the generated report first, the hand-written analysis after
        head, _, rest = text.partition("\n")
        text = f"{head}\n\n{block}\n{rest}"
    DOC.write_text(text)
    slim = {k: v for k, v in results.items() if k != "soak"} | {
        "soak": {k: v for k, v in results.get("soak", {}).items() if k != "samples"}}
    (DOC.parent / "benchmarks.json").write_text(json.dumps(slim, indent=2, default=str) + "\n")
    chart(results, CHART)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N everywhere (development)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3; 2 with --quick)")
    parser.add_argument("--soak-jobs", type=int, default=0, help="jobs in the soak (default 1,000,000; 20,000 "
                                                                 "with --quick)")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    parser.add_argument("--from-json", type=Path, help="rebuild table, docs and chart from a saved run")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        embedded = ensure_servers()
        import jobs.app  # noqa: F401  (the composition root, before any benchmark points it at a namespace)

        try:
            results = run_all(args)
        finally:
            if embedded is not None:
                embedded.stop()  # type: ignore[attr-defined]
        saved = Path(tempfile.gettempdir()) / f"drop-bench-{int(time.time())}.json"
        saved.write_text(json.dumps(results, indent=2, default=str))
        print(f"all figures: {saved}")
    rows = table(results)
    print()
    print_table(rows)
    if not args.no_docs:
        write_docs(results)
        print(f"\nwrote {DOC.relative_to(ROOT)}, {CHART.relative_to(ROOT)}, docs/benchmarks.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
