"""Issue 15 item 6: payment status polls, today's synchronous path vs the async batched one, in one
run of interleaved rounds, with the AISP refresh of the code before and after beside it:

    python -m bench polls [--rounds 3] [--payments 4000] [--latency-ms 100] [--aisp-base DIR]
                          [--aisp-accounts 10000] [--json out.json]

Each round: a CPU calibration line; N processing payments (initiated at the sandbox, status
ACSC: each completes on its first poll) and one ad hoc `pisp.poll_status` row per payment inserted
into job_outbox at once (the enqueue contract), polled by the Procfile's pool (2 × 8, relay fork,
Prometheus) against the sandbox at 100 ms per status read:

- before: `bench.polls_before` — one message per poll, row lock and connection held across the
  synchronous provider call (the code before this change);
- after: today's code — the relay's chunks of up to 100 polls, reads concurrent on the worker's
  event loop, one apply transaction per chunk.

The rate is taken from 10 % to 90 % of the payments completed; CPU per poll by role from /proc.
With `--aisp-base DIR` (a checkout of the code before the change, e.g. `git worktree add`), each
round also runs `python -m bench aisp` from DIR and from this tree (AISP must not be slower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.aisp_refresh import CREDS, Sandbox
from bench.deployed import spread
from bench.harness import ROOT, Progress, Sandboxed, cpu_meter
from bench.kyc import _cpu_ms_per_job, _process_cpu, _wait_boot
from bench.middleware_cost import calibration


def seed(sb: Sandboxed, admin: Any, n: int) -> None:
    """Users, accounts and `n` processing payments initiated at the sandbox (as the web tier does)."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.providers import get_neonomics, reset_clients
    from worker.settings import get_settings

    get_settings.cache_clear()
    reset_clients()
    client = get_neonomics()

    def initiate(i: int) -> str:
        return client.initiate_payment(idempotency_key=f"tx_{i}", consent_id="consent-1", amount_ore=20_100,
                                       currency="NOK", debtor_account={"iban": "NO9386011117947"},
                                       creditor_name="Bench", creditor_account={"bban": "26512345678"}).payment_id

    with ThreadPoolExecutor(16) as pool:
        payment_ids = list(pool.map(initiate, range(n)))
    sb.sql("""INSERT INTO users (id) SELECT 'usr_' || g FROM generate_series(0, %s - 1) g""", (n,))
    sb.sql("""INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id, balance, balance_synced_at)
              SELECT 'acc_' || g, 'usr_' || g, 'pacc', 'consent-1', 79900, now() - interval '1 hour'
                FROM generate_series(0, %s - 1) g""", (n,))
    sb.sql("""INSERT INTO transactions (id, user_id, bank_account_id, idempotency_key, amount, payment_id)
              SELECT 'tx_' || (o - 1), 'usr_' || (o - 1), 'acc_' || (o - 1), 'tx_' || (o - 1), 20100, p
                FROM unnest(%s::text[]) WITH ORDINALITY AS u(p, o)""", (payment_ids,))
    sb.sql("ANALYZE")


def run_polls(n: int, *, before: bool, latency_ms: int, timeout_s: float = 600) -> dict[str, Any]:
    with Sandboxed("polls") as sb:
        env = {**CREDS, "DROP_LOG_LEVEL": "INFO"}
        os.environ.update(CREDS)
        sandbox = Sandbox({**sb.env, **env})
        try:
            from sandbox.admin import SandboxAdmin

            admin = SandboxAdmin(sandbox.url)
            admin.reset(client_id=CREDS["NEONOMICS_CLIENT_ID"], client_secret=CREDS["NEONOMICS_CLIENT_SECRET"])
            admin.config(payment_script=["ACSC"])
            os.environ["NEONOMICS_API_URL"] = env["NEONOMICS_API_URL"] = sandbox.url
            seed(sb, admin, n)
            admin.fault("neonomics.status", latency_ms=latency_ms)
            procs0 = _process_cpu()
            pool = sb.start_drop_pool(["pisp"], ("bench.polls_before",) if before else (), **env)
            _wait_boot(pool, sb, "drop-pool", 5)
            sb.sql("""INSERT INTO job_outbox (job, payload, idempotency_key)
                      SELECT 'pisp.poll_status', jsonb_build_object('transaction_id', id),
                             'pisp.poll_status:' || id || ':sca-callback' FROM transactions""")
            sb.sql("NOTIFY job_outbox")

            def completed() -> int:
                return sb.sql("SELECT count(*) FROM transactions WHERE status = 'completed'")[0][0]

            with cpu_meter() as cpu:
                progress = Progress(n).watch(completed, timeout_s, interval=0.05, procs=sb.procs)
            cpu_ms = _cpu_ms_per_job(procs0, {"workers": pool.pid, "sandbox": sandbox.proc.pid}, progress.done)
            reads = admin.count("neonomics.status")
            audits = sb.sql("SELECT count(*) FROM audit_log WHERE action = 'payment_completed'")[0][0]
        finally:
            sandbox.stop()
        name = "before: one message per poll, lock across the sync call" if before else "after: async chunks"
        figures = {"name": name, "payments": n, "completed": progress.done, "per_s": round(progress.rate(), 1),
                   "elapsed_s": round(progress.samples[-1][0], 2), "machine_cpu_busy": round(cpu["busy"], 3),
                   "cpu_ms_per_poll": cpu_ms, "status_reads": reads, "completed_audits": audits,
                   "exact": progress.done == n and audits == n}
        print(f"  {name}: {figures['per_s']} polls/s ({progress.done}/{n}, CPU {cpu['busy']:.0%}, "
              f"reads {reads}, exactly once: {figures['exact']}); CPU ms/poll {cpu_ms}", flush=True)
        return figures


def run_aisp(tree: Path, accounts: int, latency_ms: int) -> dict[str, Any]:
    """`python -m bench aisp` of the code in `tree` (its own schema, sandbox and pool)."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    subprocess.run([sys.executable, "-m", "bench", "aisp", "--accounts", str(accounts), "--latency-ms",
                    str(latency_ms), "--json", str(out)], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    try:
        figures = json.loads(out.read_text() or "{}")
    finally:
        out.unlink(missing_ok=True)
    print(f"  AISP ({tree}): {figures.get('steady_per_s')} accounts/s steady", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench polls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payments", type=int, default=4000)
    parser.add_argument("--before-payments", type=int, default=1500,
                        help="payments for the old path (at ~100-160 polls/s, fewer keep the round short)")
    parser.add_argument("--latency-ms", type=int, default=100)
    parser.add_argument("--aisp-base", type=Path, help="a checkout of the code before the change")
    parser.add_argument("--aisp-accounts", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from bench.harness import ensure_servers, machine

    embedded = ensure_servers()
    import jobs.app  # noqa: F401  (the composition root, before any benchmark points it at a namespace)

    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            cal = calibration()
            print(f"round {r + 1}/{args.rounds}: calibration {cal} ns/loop", flush=True)
            figures: dict[str, Any] = {"calibration_ns_per_loop": cal,
                                       "before": run_polls(args.before_payments, before=True,
                                                           latency_ms=args.latency_ms),
                                       "after": run_polls(args.payments, before=False, latency_ms=args.latency_ms)}
            if args.aisp_base is not None:
                figures["aisp_before"] = run_aisp(args.aisp_base.resolve(), args.aisp_accounts, args.latency_ms)
                figures["aisp_after"] = run_aisp(ROOT, args.aisp_accounts, args.latency_ms)
            figures["calibration_end_ns_per_loop"] = calibration()
            rounds.append(figures)
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
    ratios = [f["after"]["per_s"] / f["before"]["per_s"] for f in rounds if f["before"]["per_s"]]
    print("\nfigure (min / median / max over rounds)")
    print(f"  polls after / before (goal ≥ 10)      {spread(ratios)}")
    print(f"  before polls/s                         {spread([f['before']['per_s'] for f in rounds])}")
    print(f"  after polls/s                          {spread([f['after']['per_s'] for f in rounds])}")
    for key in ("before", "after"):
        print(f"  CPU ms per poll ({key}): {[f[key]['cpu_ms_per_poll'] for f in rounds]}")
    print(f"  every poll exactly once: {all(f[k]['exact'] for f in rounds for k in ('before', 'after'))}")
    aisp_ratios: list[float] = []
    if args.aisp_base is not None:
        aisp_ratios = [f["aisp_after"].get("steady_per_s", 0) / f["aisp_before"]["steady_per_s"]
                       for f in rounds if f["aisp_before"].get("steady_per_s")]
        print(f"  AISP after / before (goal ≥ 1)         {spread(aisp_ratios)}")
        for key in ("aisp_before", "aisp_after"):
            print(f"  {key} accounts/s                {spread([f[key].get('steady_per_s', 0) for f in rounds])}")
    print(f"  calibration ns/loop {spread([f['calibration_ns_per_loop'] for f in rounds])}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rounds": rounds, "ratio": ratios,
                                         "aisp_ratio": aisp_ratios, "at": time.time()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
