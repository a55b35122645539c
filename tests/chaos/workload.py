"""Mixed workloads for the chaos scenarios, and the exact counts of their effects.

KYC: one signed `applicantReviewed` GREEN webhook per user (some resent by "Sumsub" under another
idempotency key) → exactly one approval, notification, screening row and processed event each.
Payments: one ad hoc `pisp.poll_status` per processing payment whose provider status is ACSC →
completed exactly once, cached balance untouched. AISP: one unattended `aisp.refresh_account`
per account → balance cached, every request sent recorded in the `aisp_reads` ledger.
Every row carries the run's seeded personal data, so the privacy scan has something to find.
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

import jobs
from worker.providers.sumsub import webhook_digest
from worker.settings import get_settings

SANDBOX_BALANCE_ORE = 4_523_000  # the sandbox's default 45230.00 NOK
PAYMENT_AMOUNT = 20_100
B0 = 100_000


def sign(raw: str, alg: str = "HMAC_SHA256_HEX") -> dict:
    secret = get_settings().sumsub_webhook_secret.get_secret_value().encode()
    return {"X-Payload-Digest": webhook_digest(secret, raw.encode(), alg), "X-Payload-Digest-Alg": alg}


def review_event(applicant: str, user_id: str, seeds, *, at: datetime, answer: str = "GREEN",
                 kind: str = "applicantReviewed") -> dict:
    return {
        "applicantId": applicant, "inspectionId": f"insp-{applicant}", "correlationId": f"req-{uuid.uuid4().hex}",
        "externalUserId": user_id, "levelName": "basic-kyc-level", "type": kind, "sandboxMode": False,
        "reviewStatus": "completed", "reviewResult": {"reviewAnswer": answer, "rejectLabels": []},
        "createdAtMs": at.strftime("%Y-%m-%d %H:%M:%S.") + f"{at.microsecond // 1000:03d}",
        # Personal data a real event may carry next to the decision: it must never leave the DB.
        "applicant": {"firstName": seeds.first_name, "lastName": seeds.last_name, "email": seeds.email,
                      "idDocs": [{"idDocType": "ID_CARD", "number": seeds.pid}]},
    }


def webhook_payload(body: dict | str, alg: str = "HMAC_SHA256_HEX") -> dict:
    raw = body if isinstance(body, str) else json.dumps(body)
    return {"body": raw, "headers": sign(raw, alg), "received_at": datetime.now(UTC).isoformat()}


@dataclass
class Workload:
    users: list[str] = field(default_factory=list)
    payments: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    jobs: int = 0  # outbox rows enqueued
    resends: int = 0


def _spread(i: int, n: int, spread_s: float, start: datetime) -> datetime:
    return start + timedelta(seconds=spread_s * i / max(n, 1))


def build(db_url: str, sandbox, seeds, *, kyc: int, payments: int, accounts: int, spread_s: float = 0.0,
          resend_every: int = 10) -> Workload:
    """Create the rows and enqueue the jobs (outbox), due over `spread_s` seconds, shuffled."""
    from worker.providers import get_neonomics

    w = Workload()
    now = datetime.now(UTC)
    event_at = now - timedelta(minutes=5)
    rows: list[tuple[str, dict, str]] = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(kyc):
            user_id, applicant = f"usr_k{i}_{uuid.uuid4().hex[:6]}", f"app{uuid.uuid4().hex[:20]}"
            conn.execute("INSERT INTO users (id, national_id_hash, first_name, last_name, kyc_status, "
                         "kyc_applicant_id) VALUES (%s, %s, %s, %s, 'pending', %s)",
                         (user_id, seeds.pid_hash, seeds.first_name, seeds.last_name, applicant))
            payload = webhook_payload(review_event(applicant, user_id, seeds, at=event_at))
            w.bodies.append(payload["body"])
            key = "sumsub:" + hashlib.sha256(payload["body"].encode()).hexdigest()
            rows.append(("kyc.sumsub_webhook", payload, key))
            if resend_every and i % resend_every == 0:  # Sumsub resends: the same event again
                rows.append(("kyc.sumsub_webhook", payload, key + ":resend"))
                w.resends += 1
            w.users.append(user_id)
        if payments:
            sandbox.config(payment_script=["ACSC"])
        neonomics = get_neonomics()
        for i in range(payments):
            tx_id, user_id, account_id = (f"tx_p{i}_{uuid.uuid4().hex[:6]}", f"usr_p{i}_{uuid.uuid4().hex[:6]}",
                                          f"acc_p{i}_{uuid.uuid4().hex[:6]}")
            conn.execute("INSERT INTO users (id, first_name, last_name) VALUES (%s, %s, %s)",
                         (user_id, seeds.first_name, seeds.last_name))
            conn.execute("INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id, balance, "
                         "balance_synced_at) VALUES (%s, %s, %s, 'consent-1', %s, now() - interval '1 hour')",
                         (account_id, user_id, f"pacc-{account_id}", B0 - PAYMENT_AMOUNT))
            payment_id = neonomics.initiate_payment(
                idempotency_key=tx_id, consent_id="consent-1", amount_ore=PAYMENT_AMOUNT, currency="NOK",
                debtor_account={"iban": seeds.iban}, creditor_name=f"{seeds.first_name} {seeds.last_name}",
                creditor_account={"iban": seeds.iban},
            ).payment_id
            conn.execute("INSERT INTO transactions (id, user_id, bank_account_id, idempotency_key, amount, "
                         "payment_id) VALUES (%s, %s, %s, %s, %s, %s)",
                         (tx_id, user_id, account_id, tx_id, PAYMENT_AMOUNT, payment_id))
            rows.append(("pisp.poll_status", {"transaction_id": tx_id}, f"poll:{tx_id}"))
            w.payments.append(tx_id)
        slot = now.replace(microsecond=0).isoformat()
        for i in range(accounts):
            user_id, account_id = f"usr_a{i}_{uuid.uuid4().hex[:6]}", f"acc_a{i}_{uuid.uuid4().hex[:6]}"
            conn.execute("INSERT INTO users (id, first_name, last_name) VALUES (%s, %s, %s)",
                         (user_id, seeds.first_name, seeds.last_name))
            conn.execute("INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id) "
                         "VALUES (%s, %s, %s, 'consent-1')", (account_id, user_id, account_id))
            rows.append(("aisp.refresh_account", {"bank_account_id": account_id, "initiated_by": "scheduler",
                                                  "slot": slot}, f"aisp:{account_id}:{slot}"))
            w.accounts.append(account_id)
        random.Random(7).shuffle(rows)
        start = datetime.now(UTC)
        with conn.transaction():
            for i, (job, payload, key) in enumerate(rows):
                jobs.enqueue(job, payload, idempotency_key=key, conn=conn,
                             available_at=_spread(i, len(rows), spread_s, start))
        w.jobs = len(rows)
    return w


# The workload's rows are the callers': internal producers (a running scheduler's minute slots,
# pisp.sweep's re-enqueued polls, follow-up jobs) use the reserved `drop:` prefix (docs/enqueue.md).
WORKLOAD_ROWS = "job_outbox WHERE idempotency_key NOT LIKE 'drop:%%'"


def counts(sql) -> dict[str, int]:
    return sql(f"""SELECT
        (SELECT count(*) FROM {WORKLOAD_ROWS}) AS outbox,
        (SELECT count(*) FROM {WORKLOAD_ROWS} AND done_at IS NOT NULL) AS done,
        (SELECT count(*) FROM job_outbox WHERE error IS NOT NULL) AS errored,
        (SELECT count(*) FROM dead_letters) AS dead_letters,
        (SELECT count(*) FROM users WHERE kyc_status = 'approved') AS approved,
        (SELECT count(*) FROM processed_events WHERE consumer_group = 'kyc.sumsub_webhook') AS kyc_processed,
        (SELECT count(*) FROM notifications WHERE message = 'Du er nå verifisert') AS kyc_notified,
        (SELECT count(*) FROM screening_results WHERE screening_type = 'kyc') AS kyc_screenings,
        (SELECT count(*) FROM audit_log WHERE action = 'kyc.approved') AS kyc_audits,
        (SELECT count(*) FROM transactions WHERE status = 'completed') AS completed,
        (SELECT count(*) FROM audit_log WHERE action = 'payment_completed') AS completed_audits,
        (SELECT count(*) FROM payment_balance_adjustments) AS balance_adjustments,
        (SELECT count(*) FROM bank_accounts WHERE id LIKE 'acc_p%%' AND balance <> %s) AS payment_balances_changed,
        (SELECT count(*) FROM bank_accounts WHERE id LIKE 'acc_a%%' AND balance = %s) AS aisp_synced,
        (SELECT count(*) FROM aisp_reads) AS aisp_ledger,
        (SELECT count(*) FROM aisp_reads WHERE outcome = 'ok') AS aisp_ok,
        (SELECT COALESCE(max(c), 0) FROM (SELECT count(*) AS c FROM aisp_reads GROUP BY bank_account_id) q)
            AS aisp_max_reads_per_account
    """, (B0 - PAYMENT_AMOUNT, SANDBOX_BALANCE_ORE))[0]


def assert_exact(sql, w: Workload, sandbox) -> dict[str, int]:
    """Every effect exactly once; provider requests accounted for. Returns the counts."""
    c = counts(sql)
    kyc, pay, acc = len(w.users), len(w.payments), len(w.accounts)
    assert c["outbox"] == w.jobs and c["done"] == w.jobs, c
    assert c["errored"] == 0 and c["dead_letters"] == 0, c
    assert (c["approved"], c["kyc_processed"], c["kyc_notified"], c["kyc_screenings"], c["kyc_audits"]) == (
        kyc, kyc, kyc, kyc, kyc), c
    assert (c["completed"], c["completed_audits"]) == (pay, pay), c
    assert c["balance_adjustments"] == 0 and c["payment_balances_changed"] == 0, c
    assert c["aisp_synced"] == acc, c
    # The PSD2 ledger: every balance request that reached the bank has its row (a row may exist
    # for a request a SIGKILL stopped before it was sent, never the other way round).
    balance_requests = sandbox.count("neonomics.balances")
    assert c["aisp_ok"] >= acc and c["aisp_ledger"] >= balance_requests >= acc, (c, balance_requests)
    assert c["aisp_max_reads_per_account"] <= 4, c
    c["balance_requests"] = balance_requests
    c["status_requests"] = sandbox.count("neonomics.status")
    return c
