"""The whole benchmark in one run: every figure as a ratio taken within this run, absolutes beside
it, the machine noted; a table on stdout, `docs/benchmarks.md` (between its report markers) and
`docs/benchmarks.png`.

    python -m bench report [--quick] [--soak-jobs 500000] [--no-docs]

`make bench` runs this. `--quick` uses small N everywhere (development); the full run takes
about 10 minutes on 2 cores, plus the soak (30 000 jobs by default; 500 000 with
`--soak-jobs 500000`, about half an hour more).
"""

from __future__ import annotations

import argparse
import json
import os
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
GOALS = {"kyc_vs_noop": 0.60, "vs_celery": 3.0, "p99_ms": 50.0, "aisp_per_s": 1000, "quota": 4, "fanout_s": 60.0}


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
    from bench import fanout, kyc

    quick = args.quick
    n_kyc, n_noop = (2000, 8000) if quick else (10_000, 40_000)
    results: dict[str, Any] = {"machine": machine(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
                               "quick": quick, "shape": f"{PROCESSES} processes × {THREADS} threads"}
    _step(results, "noop", kyc.run_noop_raw, n_noop)
    _step(results, "dnoop", kyc.run_noop_drop, n_noop)
    # Before/after of the point-8 change, interleaved so that other load on the machine hits both.
    _step(results, "kyc", kyc.run_kyc_drop, n_kyc)
    _step(results, "before", kyc.run_kyc_drop, n_kyc, before=True)
    _step(results, "celery", kyc.run_kyc_celery, n_kyc)
    _step(results, "kyc2", kyc.run_kyc_drop, n_kyc)
    _step(results, "before2", kyc.run_kyc_drop, n_kyc, before=True)
    _step(results, "celery2", kyc.run_kyc_celery, n_kyc)
    _step(results, "outbox", kyc.run_kyc_outbox, n_kyc)
    _step(results, "latency", kyc.run_latency, 500, 8 if quick else 20)
    _step(results, "profile", kyc.run_kyc_drop, 3000 if quick else 8000, profile_s=6 if quick else 10)
    _step(results, "aisp", run_aisp, 4000 if quick else 20_000)
    _step(results, "quota", run_quota, 50 if quick else 200)
    _step(results, "fanout", fanout.run, 100_000 if quick else 1_000_000, 10_000 if quick else 50_000)
    _step(results, "soak", kyc.run_soak, args.soak_jobs or (10_000 if quick else 30_000), timeout_s=1500)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["load_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return results


# --- figures and text ------------------------------------------------------------------------


def _get(results: dict[str, Any], key: str, field: str, default: float = float("nan")) -> float:
    value = results.get(key, {}).get(field)
    return float(value) if isinstance(value, int | float) else default


def _mean(results: dict[str, Any], keys: list[str], field: str = "per_s") -> float:
    values = [_get(results, k, field) for k in keys]
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def table(results: dict[str, Any]) -> tuple[list[tuple[str, str, str, str]], dict[str, float]]:
    """Rows of (figure, ratio, absolutes, goal/verdict) and the headline numbers."""
    noop, dnoop = _get(results, "noop", "per_s"), _get(results, "dnoop", "per_s")
    ours, before = _mean(results, ["kyc", "kyc2"]), _mean(results, ["before", "before2"])
    celery, outbox = _mean(results, ["celery", "celery2"]), _get(results, "outbox", "per_s")
    lat, aisp, quota, fan = (results.get(k, {}) for k in ("latency", "aisp", "quota", "fanout"))
    soak = results.get("soak", {})
    aisp_rate = float(aisp.get("steady_per_s") or float("nan"))
    h = {"noop": noop, "dnoop": dnoop, "ours": ours, "before": before, "celery": celery, "outbox": outbox,
         "kyc_vs_noop": ours / noop, "vs_celery": ours / celery, "gain": ours / before - 1,
         "p99": float(lat.get("p99_ms", float("nan"))), "aisp": aisp_rate}
    cpu = results.get("kyc", {}).get("cpu_ms_per_job", {})
    cpu_c = results.get("celery", {}).get("cpu_ms_per_job", {})
    rows = [
        ("1. limit: Dramatiq no-op, default middleware", "1.00 (reference)", f"{noop:,.0f} jobs/s", "—"),
        ("   no-op through drop-worker's middleware", f"{dnoop / noop:.2f} of the limit", f"{dnoop:,.0f} jobs/s",
         "—"),
        ("2. KYC webhook, end to end (digest, parse, 1 transaction)", f"{h['kyc_vs_noop']:.1%} of the limit",
         f"{ours:,.0f} jobs/s (runs: {_get(results, 'kyc', 'per_s'):,.0f}, {_get(results, 'kyc2', 'per_s'):,.0f})",
         f"≥ 60 %: {verdict(h['kyc_vs_noop'] >= GOALS['kyc_vs_noop'])}"),
        ("   KYC through the outbox relay (production path)", f"{outbox / ours:.2f} of preloaded",
         f"{outbox:,.0f} jobs/s", "—"),
        ("3. peer: same handler under Celery (acks_late, 2×8)", f"ours / Celery = {h['vs_celery']:.2f}×",
         f"Celery {celery:,.0f} jobs/s (runs: {_get(results, 'celery', 'per_s'):,.0f}, "
         f"{_get(results, 'celery2', 'per_s'):,.0f})", f"≥ 3×: {verdict(h['vs_celery'] >= GOALS['vs_celery'])}"),
        ("   CPU per KYC job, ms (workers / PostgreSQL / Redis)",
         f"ours / Celery workers = {cpu.get('workers', 0) / max(cpu_c.get('workers', 0), 1e-9):.2f}",
         f"ours {cpu.get('workers', 0):.2f} / {cpu.get('postgres', 0):.2f} / {cpu.get('redis', 0):.2f}; Celery "
         f"{cpu_c.get('workers', 0):.2f} / {cpu_c.get('postgres', 0):.2f} / {cpu_c.get('redis', 0):.2f}", "—"),
        ("4. latency enqueue→effect committed, 500 jobs/s offered",
         f"p99 / goal = {h['p99'] / GOALS['p99_ms']:.1f}",
         f"p50 {lat.get('p50_ms')} ms, p95 {lat.get('p95_ms')} ms, p99 {lat.get('p99_ms')} ms "
         f"({lat.get('measured')} jobs, {lat.get('offered_per_s')}/s offered)",
         f"p99 < 50 ms: {verdict(h['p99'] < GOALS['p99_ms'])}"),
        ("5. AISP refresh, sandbox at 100 ms", f"{aisp_rate / GOALS['aisp_per_s']:.2f} of the goal",
         f"{aisp_rate:,.0f} accounts/s steady ({aisp.get('accounts')} accounts, "
         f"{aisp.get('processes')}×{aisp.get('threads')} threads)",
         f"≥ 1000/s: {verdict(aisp_rate >= GOALS['aisp_per_s'])}"),
        ("   unattended reads per account, 6 slots in 24 h", f"{quota.get('max_reads_per_account')} / 4",
         f"{quota.get('accounts')} accounts; sandbox saw {quota.get('sandbox_requests')} requests",
         f"≤ 4: {verdict((quota.get('max_reads_per_account') or 99) <= GOALS['quota'])}"),
        ("6. fan-out, 1 M accounts → outbox (the enqueue)",
         f"{float(fan.get('fanout_s', float('nan'))) / GOALS['fanout_s']:.2f} of the 60 s budget",
         f"{fan.get('fanout_s')} s, {fan.get('refreshes_enqueued'):,} refreshes in {fan.get('outbox_rows'):,} rows"
         if fan.get("outbox_rows") is not None else "—",
         f"< 60 s: {verdict(float(fan.get('fanout_s', 1e9)) < GOALS['fanout_s'])}"),
        ("   … and all of it relayed into Redis (spread 0)",
         f"relay pipelined / one-by-one = "
         f"{fan.get('relay_new_per_s', 0) / max(fan.get('relay_old_per_s') or 1, 1):.1f}×",
         f"{fan.get('enqueue_to_redis_s')} s in total; relay {fan.get('relay_new_per_s')} rows/s "
         f"(one-by-one {fan.get('relay_old_per_s')}); Redis {(fan.get('redis_bytes') or 0) / 2**20:.0f} MiB for "
         f"{fan.get('redis_messages')} messages", f"< 60 s: {verdict(float(fan.get('enqueue_to_redis_s', 1e9)) < 60)}"),
        ("7. soak: worker RSS over the run",
         f"end / after warm-up = {soak.get('rss_end_mib', 0) / max(soak.get('rss_after_warmup_mib') or 1, 1):.3f}",
         f"{soak.get('done')} jobs in {soak.get('elapsed_s')} s; {soak.get('rss_after_warmup_mib')} → "
         f"{soak.get('rss_end_mib')} MiB ({soak.get('processes')} processes); slope "
         f"{soak.get('slope_kib_per_100k_jobs')} KiB per 100k jobs",
         "flat" + ("" if (soak.get("done") or 0) >= 500_000 else f" (only {soak.get('done')} jobs: short of 500k)")),
        ("8. point-8 change (CrashGuard: one Lua command; lock-free get_redis)",
         f"after / before = {ours / before:.2f}",
         f"{ours:,.0f} vs {before:,.0f} jobs/s (runs: {_get(results, 'before', 'per_s'):,.0f}, "
         f"{_get(results, 'before2', 'per_s'):,.0f} before); worker CPU {cpu.get('workers', 0):.2f} vs "
         f"{results.get('before', {}).get('cpu_ms_per_job', {}).get('workers', 0):.2f} ms/job", "—"),
    ]
    return rows, h


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    head = ("figure", "ratio (same run)", "absolute", "goal")
    widths = [max(w, len(x)) for w, x in zip(widths, head, strict=True)]
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, h = table(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    labels = ["Dramatiq\nno-op", "drop stack\nno-op", "KYC\ndrop-worker", "KYC\nbefore #8", "KYC\nCelery",
              "KYC via\noutbox"]
    values = [h["noop"], h["dnoop"], h["ours"], h["before"], h["celery"], h["outbox"]]
    bars = axes[0].bar(labels, values, color=["#999", "#bbb", "#2a7", "#8cb", "#c75", "#4a9"])
    for bar, v in zip(bars, values, strict=True):
        axes[0].annotate(f"{v:,.0f}/s\n{v / h['noop']:.0%}", (bar.get_x() + bar.get_width() / 2, v),
                         ha="center", va="bottom", fontsize=8)
    axes[0].axhline(0.6 * h["noop"], ls="--", c="k", lw=0.8)
    axes[0].text(5.4, 0.6 * h["noop"], "goal: 60 % of no-op", ha="right", va="bottom", fontsize=8)
    axes[0].set_title("Throughput, 2 processes × 8 threads (jobs/s)")
    axes[0].tick_params(axis="x", labelsize=8)
    lat = results.get("latency", {})
    names = ["p50", "p95", "p99"]
    vals = [float(lat.get(f"{n}_ms") or 0) for n in names]
    axes[1].bar(names, vals, color="#47a")
    axes[1].axhline(50, ls="--", c="k", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_title(f"Enqueue → effect committed at {lat.get('offered_per_s')} jobs/s (ms, log)")
    for i, v in enumerate(vals):
        axes[1].annotate(f"{v:,.0f} ms", (i, v), ha="center", va="bottom", fontsize=8)
    soak = results.get("soak", {})
    samples = soak.get("samples") or []
    if samples:
        axes[2].plot([d for _, d, _ in samples], [r for *_, r in samples], c="#a44")
    axes[2].set_title(f"Soak: worker RSS (MiB, {soak.get('processes')} processes) vs jobs done")
    axes[2].set_xlabel("jobs done")
    axes[2].set_ylim(bottom=0)
    m = results.get("machine", {})
    fig.suptitle(f"drop-worker benchmarks, one run {results.get('started')} — {m.get('nproc')} × {m.get('cpu')}, "
                 f"{m.get('ram')}, Python {m.get('python')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    rows, _ = table(results)
    m = results["machine"]
    out = [START, "", "## Report of the last full run (`make bench`, generated by `bench/report.py`)", "",
           f"Run {results['started']} → {results.get('finished')}"
           + (" (**quick mode: small N, not for quoting**)" if results.get("quick") else "") + ".", "",
           "| machine | |", "|---|---|",
           f"| CPU | {m['nproc']} × {m['cpu']} |", f"| RAM | {m['ram']} |", f"| OS | {m['os']} |",
           f"| Python | {m['python']} |", f"| packages | {m['packages']} |",
           f"| servers | PostgreSQL {m.get('postgres_server')}, Redis {m.get('redis_server')} "
           "(loopback, on the same cores) |",
           f"| load average (1, 5, 15 min) | start {m['load_at_start']}, end {results.get('load_at_end')} |",
           f"| worker shape | {results['shape']} (the Procfile's) for every queue system |", "",
           "Every ratio below is between figures of this one run; absolutes are beside it.", "",
           "| figure | ratio (same run) | absolute | goal |", "|---|---|---|---|"]
    out += [f"| {a.strip()} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += ["", "![benchmarks](benchmarks.png)", ""]
    prof = results.get("profile", {}).get("profile", {})
    if prof.get("buckets"):
        out += ["Profile of one KYC worker process (py-spy `--gil`: where its CPU goes; after the change):", "",
                "| where | share of samples |", "|---|---|"]
        out += [f"| {name} | {pct} % |" for name, pct in prof["buckets"]]
        out += ["", "Top frames (inclusive):", ""]
        out += [f"- {pct} % `{frame}`" for frame, pct in prof["top"][:14] if "bootstrap" not in frame]
        out += [""]
    durations = results.get("_durations", {})
    out += ["Step durations (s): " + ", ".join(f"{k} {v}" for k, v in durations.items()), ""]
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v and k != "profile"}
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
    parser.add_argument("--soak-jobs", type=int, default=0, help="jobs in the soak (default 30 000; 500 000 for "
                                                                 "the long soak)")
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
    rows, _ = table(results)
    print()
    print_table(rows)
    if not args.no_docs:
        write_docs(results)
        print(f"\nwrote {DOC.relative_to(ROOT)}, {CHART.relative_to(ROOT)}, docs/benchmarks.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
