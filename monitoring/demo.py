"""Demo for `make run`: a few users, accounts and payments driven through the real jobs against
the provider sandbox, with progress printed until every outcome is in PostgreSQL.

- KYC: each demo user gets a Sumsub applicant at the sandbox; the sandbox's mock review (90 %
  GREEN, docs/sandbox.md) sends a signed webhook into `job_outbox`, as the web tier would.
- AISP: a user-initiated balance refresh per account (the sandbox answers after its latency).
- PISP: one payment the user confirms at the bank (polled to `completed`), and one never
  confirmed, which `sca.expire_timeouts` fails with SCA_TIMEOUT at the next minute.

Everything goes through the outbox → relay → Redis → worker path; nothing is faked in the jobs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx

import jobs
from db.pool import one_row, transaction
from sandbox.admin import SandboxAdmin
from worker.providers import get_neonomics
from worker.settings import get_settings

DEMO_USERS = [
    ("demo_user_1", "Kari", "Nordmann", "01017012345"),
    ("demo_user_2", "Ola", "Nordmann", "02028054321"),
    ("demo_user_3", "Ingrid", "Hansen", "03039011111"),
]


class ForeignSandbox(Exception):
    """The sandbox on the configured port belongs to another instance (another `make run`)."""


def _sandbox() -> tuple[SandboxAdmin | None, str]:
    """The sandbox admin client when the provider URL points at this instance's running
    sandbox, else None. A sandbox that refuses this instance's admin token, or that writes into
    another database, is another instance's: driving it would put this demo's webhooks and dead
    letters into that instance's database (issue 18), so ForeignSandbox is raised instead."""

    settings = get_settings()
    url = settings.neonomics_api_url.rstrip("/")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        admin = SandboxAdmin(url)
        try:
            if admin.health():
                # The token is read now that the sandbox answers (it writes its token file before
                # listening): one read before it was up may be a killed run's stale file (a 401).
                admin.close()
                admin = SandboxAdmin(url)
                if not admin.writes_into(settings.database_url or ""):
                    raise ForeignSandbox(f"the sandbox at {url} writes into another database")
                return admin, url
        except httpx.HTTPStatusError as error:
            if error.response.status_code in (401, 403):
                raise ForeignSandbox(f"the sandbox at {url} refuses this instance's admin token") from None
        except (httpx.HTTPError, ValueError):
            pass
        admin.close()
        time.sleep(0.5)
    return None, url


def seed(run_id: str) -> None:
    """Demo users and accounts (idempotent), reset to 'waiting for KYC' for this run."""
    with transaction() as conn:
        for i, (uid, first, last, pid) in enumerate(DEMO_USERS, start=1):
            conn.execute(
                """INSERT INTO users (id, national_id_hash, first_name, last_name)
                   VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO NOTHING""",
                (uid, hashlib.sha256(pid.encode()).hexdigest(), first, last),
            )
            conn.execute(
                "UPDATE users SET kyc_status = 'pending', kyc_applicant_id = %s WHERE id = %s",
                (f"demo-{run_id}-{i}", uid),
            )
            conn.execute(
                """INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id)
                   VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO NOTHING""",
                (f"demo_acct_{i}", uid, f"demo-provider-acct-{i}", f"demo-consent-{i}"),
            )


def _start_payment(admin, run_id: str, n: int, *, confirm: bool) -> str:


    tx_id = f"demo-tx-{run_id}-{n}"
    payment = get_neonomics().initiate_payment(
        idempotency_key=tx_id,
        consent_id="demo-consent-1",
        amount_ore=20_100 * n,
        currency="NOK",
        debtor_account={"iban": "NO9386011117947"},
        creditor_name="Demo Mottaker",
        creditor_account={"bban": "26512345678"},
        remittance=f"Drop demo {n}",
    )
    created_at = datetime.now(UTC)
    if not confirm:  # the user never finishes SCA: the deadline passed a moment ago
        admin.set_payment(payment.payment_id, status="ACTC")
        created_at -= timedelta(seconds=get_settings().sca_timeout_seconds + 5)
    with transaction() as conn:
        conn.execute(
            """INSERT INTO transactions (id, user_id, bank_account_id, idempotency_key, amount, payment_id, created_at)
               VALUES (%s, 'demo_user_1', 'demo_acct_1', %s, %s, %s, %s)""",
            (tx_id, tx_id, 20_100 * n, payment.payment_id, created_at),
        )
    if confirm:
        # The user completes BankID at the bank; the bank redirects to the web tier's callback,
        # which enqueues an immediate poll.
        httpx.get(payment.sca_redirect or f"{admin.url}/sca/{payment.payment_id}", params={"result": "ok"}, timeout=10)
        key = f"pisp.poll_status:{tx_id}:sca-callback"
        jobs.enqueue("pisp.poll_status", {"transaction_id": tx_id}, idempotency_key=key)
    return tx_id


def start(run_id: str) -> dict:
    """Kick off the demo's work; return what to watch."""

    seed(run_id)
    try:
        admin, url = _sandbox()
    except ForeignSandbox as foreign:
        print(f"demo: {foreign} (another `make run`?); not driving it. Stop the other instance or give this "
              "one its own ports (DROP_SANDBOX_PORT)", flush=True)
        return {"sandbox": False, "transactions": []}
    if admin is None:
        print(f"demo: no provider sandbox at {url}; only housekeeping is demonstrated", flush=True)
        jobs.enqueue("housekeeping.prune", {}, idempotency_key=f"demo:{run_id}:prune")
        return {"sandbox": False, "transactions": []}
    for i in range(1, len(DEMO_USERS) + 1):
        applicant = f"demo-{run_id}-{i}"
        admin.create_applicant(f"demo_user_{i}", applicant_id=applicant)
        admin.review(applicant, None, delay_s=1.0 + i)  # the mock draw: 90 % GREEN
        admin.set_account(
            f"demo-provider-acct-{i}", amount=f"{12_345 * i}.67", currency="NOK", consent_id=f"demo-consent-{i}"
        )
        jobs.enqueue(
            "aisp.refresh_account",
            {"bank_account_id": f"demo_acct_{i}", "initiated_by": "user", "psu_ip_address": "127.0.0.1"},
            idempotency_key=f"aisp:demo_acct_{i}:user:{run_id}",
        )
    transactions = [_start_payment(admin, run_id, 1, confirm=True), _start_payment(admin, run_id, 2, confirm=False)]
    print(
        "demo: 3 KYC reviews at the sandbox, 3 balance refreshes, 2 payments (1 confirmed, 1 never confirmed)",
        flush=True,
    )
    return {"sandbox": True, "transactions": transactions}


def progress(run_id: str, started: datetime, transactions: list[str]) -> dict:
    with transaction() as conn:
        kyc = one_row(conn.execute(
            """SELECT count(*) FILTER (WHERE s.result = 'approved') AS approved,
                      count(*) FILTER (WHERE s.result IN ('rejected', 'retry')) AS other
                 FROM screening_results s WHERE s.screening_type = 'kyc' AND s.provider_ref LIKE %s""",
            (f"demo-{run_id}-%",),
        ).fetchone())
        balances = one_row(conn.execute(
            "SELECT count(*) AS n FROM bank_accounts WHERE id LIKE 'demo_acct_%%' AND balance_synced_at >= %s",
            (started,),
        ).fetchone())["n"]
        payments = conn.execute(
            "SELECT status, failure_reason FROM transactions WHERE id = ANY(%s) ORDER BY id", (transactions,)
        ).fetchall()
    return {
        "kyc_decided": kyc["approved"] + kyc["other"],
        "kyc_approved": kyc["approved"],
        "balances": balances,
        "payments": [p["status"] + (f"/{p['failure_reason']}" if p["failure_reason"] else "") for p in payments],
    }


def run_demo(*, watch: bool = True, timeout: float = 150.0, should_stop: Callable[[], bool] = lambda: False) -> dict:
    run_id = datetime.now(UTC).strftime("%H%M%S")
    started = datetime.now(UTC) - timedelta(seconds=1)
    plan = start(run_id)
    state: dict = {}
    if not watch or not plan["sandbox"]:
        return state
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline and not should_stop():
        state = progress(run_id, started, plan["transactions"])
        line = (
            f"demo: KYC {state['kyc_decided']}/3 decided ({state['kyc_approved']} approved) · "
            f"balances {state['balances']}/3 synced · payments {', '.join(state['payments'])}"
        )
        if line != last:
            print(line, flush=True)
            last = line
        if state["kyc_decided"] == 3 and state["balances"] == 3 and "processing" not in ",".join(state["payments"]):
            print(
                "demo: done — every outcome is in PostgreSQL; `drop-jobs status` for the system view; "
                "Ctrl-C stops everything",
                flush=True,
            )
            break
        time.sleep(1.0)
    return state
