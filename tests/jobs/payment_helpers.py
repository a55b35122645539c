"""Helpers for the payment saga tests: payments initiated at the sandbox over HTTP, rows written
the way the web tier writes them, and a real PostgreSQL commit failure for crash tests."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from worker.providers import get_neonomics

B0 = 100_000  # the bank balance before the payment (øre)
AMOUNT = 20_100  # 201.00 NOK

FINAL_ACTIONS = ("payment_completed", "payment_failed", "payment_sca_timeout")


def make_payment(
    sql,
    sandbox,
    *,
    status: str | None = "ACTC",
    script: list[str] | None = None,
    age: timedelta = timedelta(0),
    synced: str = "before",
    payment_id: str | None = "initiate",
    amount: int = AMOUNT,
) -> dict:
    """A processing payment as the web tier leaves it: cached balance already debited by the
    amount, `created_at` = now - age. `synced`: 'before' / 'after' the payment / 'never'.
    `payment_id`: 'initiate' (a real sandbox payment), None, or a literal id."""
    tx_id = f"tx_{uuid.uuid4().hex[:10]}"
    user_id = f"usr_{uuid.uuid4().hex[:8]}"
    account_id = f"acc_{uuid.uuid4().hex[:8]}"
    created = sql("SELECT now() - %s AS t", (age,))[0]["t"]
    synced_at = {"before": created - timedelta(hours=1), "after": created + timedelta(seconds=30),
                 "never": None}[synced]
    sql("INSERT INTO users (id) VALUES (%s)", (user_id,))
    sql("""INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id, balance, balance_synced_at)
           VALUES (%s, %s, 'pacc', 'consent-1', %s, %s)""",
        (account_id, user_id, None if synced == "never" else B0 - amount, synced_at))
    if payment_id == "initiate":
        payment_id = get_neonomics().initiate_payment(
            idempotency_key=tx_id, consent_id="consent-1", amount_ore=amount, currency="NOK",
            debtor_account={"iban": "NO9386011117947"}, creditor_name="Test Creditor",
            creditor_account={"bban": "26512345678"},
        ).payment_id
        if script is not None:
            sandbox.set_payment(payment_id, script=script)
        elif status is not None:
            sandbox.set_payment(payment_id, status=status)
    sql("""INSERT INTO transactions (id, user_id, bank_account_id, idempotency_key, amount, payment_id, created_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (tx_id, user_id, account_id, tx_id, amount, payment_id, created))
    return {"id": tx_id, "user_id": user_id, "account_id": account_id, "payment_id": payment_id,
            "created_at": created}


def tx(sql, tx_id: str) -> dict:
    return sql("SELECT * FROM transactions WHERE id = %s", (tx_id,))[0]


def balance(sql, account_id: str) -> int | None:
    return sql("SELECT balance FROM bank_accounts WHERE id = %s", (account_id,))[0]["balance"]


def notifications(sql, user_id: str) -> list[dict]:
    return sql("SELECT kind, message FROM notifications WHERE user_id = %s ORDER BY id", (user_id,))


def audits(sql, tx_id: str) -> list[dict]:
    return sql("SELECT action, details FROM audit_log WHERE details->>'transaction_id' = %s ORDER BY id", (tx_id,))


def adjustments(sql, tx_id: str) -> list[str]:
    return [r["kind"] for r in sql(
        "SELECT kind FROM payment_balance_adjustments WHERE transaction_id = %s ORDER BY created_at, kind", (tx_id,))]


def outbox_polls(sql, tx_id: str) -> list[dict]:
    return sql("""SELECT payload, idempotency_key, available_at FROM job_outbox
                   WHERE job = 'pisp.poll_status' AND payload->>'transaction_id' = %s ORDER BY id""", (tx_id,))


def install_commit_crash(sql, times: int = 1) -> None:
    """The next `times` commits that updated a transactions row fail at COMMIT (a deferred
    constraint trigger): the provider call has happened, the database change is lost — what a
    worker killed between the two leaves behind."""
    sql("CREATE SEQUENCE IF NOT EXISTS crash_seq")
    sql(f"""CREATE OR REPLACE FUNCTION crash_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('crash_seq') <= {int(times)} THEN
                    RAISE EXCEPTION 'simulated crash before commit';
                END IF;
                RETURN NULL;
            END $$""")
    sql("""CREATE CONSTRAINT TRIGGER crash_at_commit AFTER UPDATE ON transactions
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION crash_at_commit()""")


def alerts(caplog, title: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "worker.alerts" and title in r.getMessage()]


def iso(t: datetime) -> str:
    return t.isoformat()
