"""Demo data and demo jobs for `make run`: a few users, accounts and payments, and jobs that
exercise the whole path (outbox → relay → Redis → worker → PostgreSQL), with progress shown.

Only jobs that are registered are enqueued, so the demo grows with the job families.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

from db.pool import transaction

DEMO_USERS = [
    ("demo_user_1", "Kari", "Nordmann", "01017012345"),
    ("demo_user_2", "Ola", "Nordmann", "02028054321"),
    ("demo_user_3", "Ingrid", "Hansen", "03039011111"),
]


def seed() -> None:
    """Idempotent: demo rows are inserted once (ON CONFLICT DO NOTHING)."""
    with transaction() as conn:
        for i, (uid, first, last, pid) in enumerate(DEMO_USERS, start=1):
            conn.execute(
                """INSERT INTO users (id, national_id_hash, first_name, last_name, kyc_status, kyc_applicant_id)
                   VALUES (%s, %s, %s, %s, 'pending', %s) ON CONFLICT (id) DO NOTHING""",
                (uid, hashlib.sha256(pid.encode()).hexdigest(), first, last, f"demo_applicant_{i}"),
            )
            conn.execute(
                """INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id, balance, balance_synced_at)
                   VALUES (%s, %s, %s, %s, %s, now() - interval '7 hours') ON CONFLICT (id) DO NOTHING""",
                (f"demo_acct_{i}", uid, f"demo_provider_acct_{i}", f"demo_consent_{i}", 1_000_000 * i),
            )


def demo_jobs(run_id: str) -> list[tuple[str, dict, str]]:
    """(job, payload, idempotency key) for every demo job whose actor exists."""
    import jobs

    known = set(jobs.broker.actors)
    planned: list[tuple[str, dict, str]] = []
    if "aisp.refresh_account" in known:
        for i in range(1, len(DEMO_USERS) + 1):
            planned.append(
                (
                    "aisp.refresh_account",
                    {"bank_account_id": f"demo_acct_{i}", "initiated_by": "user", "psu_ip_address": "127.0.0.1"},
                    f"demo:{run_id}:aisp:{i}",
                )
            )
    for n in range(3):
        planned.append(("housekeeping.prune", {}, f"demo:{run_id}:prune:{n}"))
    return planned


def run_demo(*, watch: bool = True, timeout: float = 120.0, should_stop: Callable[[], bool] = lambda: False) -> dict:
    import jobs

    seed()
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    ids = []
    for job, payload, key in demo_jobs(run_id):
        outbox_id = jobs.enqueue(job, payload, idempotency_key=key)
        if outbox_id is not None:
            ids.append(outbox_id)
    print(f"demo: {len(ids)} job(s) enqueued through the outbox", flush=True)
    progress = {"total": len(ids), "done": 0, "failed": 0}
    if not watch or not ids:
        return progress
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline and not should_stop():
        with transaction() as conn:
            row = conn.execute(
                """SELECT count(*) FILTER (WHERE done_at IS NOT NULL) AS done,
                          count(*) FILTER (WHERE error IS NOT NULL) AS failed,
                          count(*) FILTER (WHERE relayed_at IS NOT NULL) AS relayed
                     FROM job_outbox WHERE id = ANY(%s)""",
                (ids,),
            ).fetchone()
        progress.update(done=row["done"], failed=row["failed"])
        line = f"demo: {row['done']}/{len(ids)} done, {row['relayed']} relayed, {row['failed']} failed"
        if line != last:
            print(line, flush=True)
            last = line
        if row["done"] + row["failed"] >= len(ids):
            print("demo: all demo jobs finished — see `drop-jobs status`; Ctrl-C stops everything", flush=True)
            break
        time.sleep(0.5)
    return progress
