"""AISP refresh against real PostgreSQL, Redis and the sandbox over HTTP (no mocks).

The PSD2 quota is checked where it matters: the sandbox counts the requests it received.
Time is injected (`now=` / `jobs.aisp.clock`) so the 24 h window is crossed without waiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

import jobs
from jobs import aisp, aisp_batch
from jobs import aisp_rules as rules
from tests.conftest import wait_for
from worker.money import BIGINT_MAX
from worker.providers.errors import AuthenticationError, ProviderTimeout, ServerError
from worker.providers.neonomics import close_async_neonomics
from worker.retry import PermanentError

T0 = datetime(2026, 3, 2, 5, 20, tzinfo=UTC)  # 06:20 Oslo, just after the 06:15 slot


def run(coro):
    """One event loop per call: fresh async pool and client, closed afterwards."""

    async def main():
        try:
            return await coro
        finally:
            await aisp.close_async_pool()
            await close_async_neonomics()

    return asyncio.run(main())


def refresh(account="ba-1", initiated_by="scheduler", ip=None, now=T0, **kw):
    return run(aisp.refresh_handled(account, initiated_by, ip, now=now, **kw))


def add_accounts(sql, sandbox=None, n=1, prefix="ba", *, balance=None, currency="NOK", **columns):
    sql("INSERT INTO users (id) VALUES ('u-1') ON CONFLICT DO NOTHING")
    ids = [f"{prefix}-{i}" for i in range(1, n + 1)] if n > 1 or prefix != "ba" else ["ba-1"]
    cols = {"consent_status": "valid", "needs_relink": False, **columns}
    for account in ids:
        sql(
            """INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id, currency, balance,
                                          balance_synced_at, consent_status, needs_relink)
               VALUES (%s, 'u-1', %s, %s, %s, %s, %s, %s, %s)""",
            (account, f"acc-{account}", cols.get("consent_id", f"consent-{account}"), currency, balance,
             T0 - timedelta(hours=6) if balance is not None else None, cols["consent_status"], cols["needs_relink"]),
        )
        if sandbox is not None:
            sandbox.set_account(f"acc-{account}", consent_id=f"consent-{account}")
    return ids


def account(sql, account_id="ba-1"):
    return sql("SELECT * FROM bank_accounts WHERE id = %s", (account_id,))[0]


def ledger(sql, account_id="ba-1"):
    return sql("SELECT * FROM aisp_reads WHERE bank_account_id = %s ORDER BY id", (account_id,))


def unattended(sandbox):
    return [r for r in sandbox.requests("neonomics.balances") if not r["psu_ip_address"]]


# --- success and amounts -------------------------------------------------------------------------


@pytest.mark.parametrize(("amount", "ore"), [
    ("45230.00", 4_523_000), ("-12.5", -1_250), ("0.01", 1), ("92233720368547758.07", BIGINT_MAX),
])
def test_a_read_stores_ore_and_the_sync_time_and_is_in_the_ledger(db, sql, sandbox, amount, ore):
    add_accounts(sql, sandbox)
    sandbox.set_account("acc-ba-1", amount=amount)
    result = refresh()
    assert (result.outcome, result.balance_ore) == ("ok", ore)
    row = account(sql)
    assert (row["balance"], row["balance_synced_at"]) == (ore, T0)
    [read] = ledger(sql)
    assert (read["initiated_by"], read["outcome"], read["http_status"], read["requested_at"]) == (
        "scheduler", "ok", 200, T0)
    [sent] = sandbox.requests("neonomics.balances")
    assert sent["x_request_id"] == read["request_id"] and not sent["psu_ip_address"]
    assert sent["x_consent_id"] == "consent-ba-1"


@pytest.mark.parametrize("amount", ["1e3", "99999999999999999999.99", "92233720368547758.08", "12.345", "NaN"])
def test_bad_amounts_are_refused_recorded_and_never_stored(db, sql, sandbox, amount):
    add_accounts(sql, sandbox, balance=777)
    sandbox.set_account("acc-ba-1", amount=amount)
    with pytest.raises(aisp.AispReadError) as info:
        refresh()
    assert amount not in str(info.value)  # the dead-letter reason carries no amount
    row = account(sql)
    assert (row["balance"], row["balance_synced_at"]) == (777, T0 - timedelta(hours=6))
    assert [r["outcome"] for r in ledger(sql)] == ["malformed"]  # it was sent: it counts


def test_balance_types_expected_then_interim_available_then_closing_booked(db, sql, sandbox):
    add_accounts(sql, sandbox)

    def raw(*kinds):
        return [{"balanceType": k, "balanceAmount": {"currency": "NOK", "amount": f"{i + 1}.00"}}
                for i, k in enumerate(kinds)]

    sandbox.set_account("acc-ba-1", raw_balances=raw("closingBooked", "interimAvailable"))
    assert refresh().balance_ore == 200
    sandbox.set_account("acc-ba-1", raw_balances=raw("openingBooked", "closingBooked"))
    assert refresh(now=T0 + timedelta(minutes=1)).balance_ore == 200
    sandbox.set_account("acc-ba-1", raw_balances=raw("interimBooked"))
    with pytest.raises(rules.NoUsableBalanceError):
        refresh(now=T0 + timedelta(minutes=2))
    assert account(sql)["balance"] == 200


def test_currency_mismatch_is_an_error_not_a_silent_store(db, sql, sandbox):
    add_accounts(sql, sandbox, balance=500)
    sandbox.set_account("acc-ba-1", currency="EUR", amount="10.00")
    with pytest.raises(rules.CurrencyMismatchError):
        refresh()
    assert account(sql)["balance"] == 500
    assert [r["outcome"] for r in ledger(sql)] == ["currency_mismatch"]
    [audit] = sql("SELECT action, details FROM audit_log")
    assert audit["action"] == "aisp.currency_mismatch"
    assert (audit["details"]["account_currency"], audit["details"]["provider_currency"]) == ("NOK", "EUR")


# --- consent, 429, 5xx, breaker, token ------------------------------------------------------------


@pytest.mark.parametrize(("code", "status_after"), [
    ("CONSENT_EXPIRED", "expired"), ("CONSENT_INVALID", "revoked"), ("CONSENT_UNKNOWN", "revoked"),
])
def test_consent_errors_clear_the_consent_notify_audit_and_stop_reading(db, sql, sandbox, code, status_after):
    add_accounts(sql, sandbox, balance=123)
    if code == "CONSENT_UNKNOWN":
        sandbox.set_account("acc-ba-1", consent_id="another-consent")
    else:
        sandbox.expire_consent("acc-ba-1", code)
    before = aisp.CONSENTS_EXPIRED.labels(code)._value.get()
    assert refresh().outcome == "consent_error"
    row = account(sql)
    assert (row["consent_id"], row["consent_status"], row["needs_relink"]) == (None, status_after, True)
    assert (row["balance"], row["balance_synced_at"]) == (123, T0 - timedelta(hours=6))
    [note] = sql("SELECT user_id, kind, message FROM notifications")
    assert note == {"user_id": "u-1", "kind": "bank_relink", "message": aisp.RELINK_MESSAGE}
    [audit] = sql("SELECT action, details FROM audit_log")
    assert audit["action"] == "aisp.consent_expired" and audit["details"]["code"] == code
    assert aisp.CONSENTS_EXPIRED.labels(code)._value.get() == before + 1
    # Stopped: neither the scheduler nor the user reads this account again until it is re-linked.
    assert refresh(now=T0 + timedelta(hours=6)).outcome == "no_consent"
    assert refresh(initiated_by="user", ip="203.0.113.9").outcome == "no_consent"
    assert sandbox.count("neonomics.balances") == 1
    assert [r["outcome"] for r in ledger(sql)] == ["consent_error"]


def test_429_stops_unattended_reads_for_the_window_and_keeps_the_cached_balance(db, sql, sandbox):
    add_accounts(sql, sandbox, balance=900)
    sandbox.fault("neonomics.balances", status=429, retry_after=60, count=1)
    assert refresh().outcome == "access_exceeded"
    row = account(sql)
    next_slot = rules.next_window_start(T0)
    assert (row["balance"], row["aisp_paused_until"]) == (900, next_slot)
    refused = aisp.QUOTA_REFUSALS.labels("paused")._value.get()
    assert refresh(now=T0 + timedelta(minutes=30)).outcome == "paused"
    assert aisp.QUOTA_REFUSALS.labels("paused")._value.get() == refused + 1
    assert sandbox.count("neonomics.balances") == 1
    assert refresh(initiated_by="user", ip="198.51.100.4", now=T0 + timedelta(minutes=31)).outcome == "ok"
    assert refresh(now=next_slot + timedelta(minutes=5)).outcome == "ok"  # the next window reads again
    assert [r["outcome"] for r in ledger(sql)] == ["access_exceeded", "ok", "ok"]


def test_5xx_keeps_the_cached_balance_counts_and_each_retry_reserves(db, sql, sandbox):
    add_accounts(sql, sandbox, balance=321)
    sandbox.fault("neonomics.balances", status=503, count=2)
    for minute in (0, 1):
        with pytest.raises(ServerError):
            refresh(now=T0 + timedelta(seconds=minute))
        row = account(sql)
        assert (row["balance"], row["balance_synced_at"]) == (321, T0 - timedelta(hours=6))
    assert refresh(now=T0 + timedelta(seconds=2)).outcome == "ok"
    assert [r["outcome"] for r in ledger(sql)] == ["server_error", "server_error", "ok"]
    # Two failures and a success used three of today's four: only one more unattended read.
    assert refresh(now=T0 + timedelta(hours=6)).outcome == "ok"
    assert refresh(now=T0 + timedelta(hours=12)).outcome == "quota"
    assert len(unattended(sandbox)) == 4


def test_open_breaker_sends_nothing_gives_the_reservation_back_and_reschedules(db, sql, sandbox):
    add_accounts(sql, sandbox, balance=55)
    sandbox.fault("neonomics.balances", status=500)
    for i in range(3):
        with pytest.raises(ServerError):
            refresh(now=T0 + timedelta(seconds=i))
    again = refresh(now=T0 + timedelta(seconds=3))
    assert again.outcome == "circuit_open"
    assert 1_000 < again.run_later_ms <= (60 + aisp.CIRCUIT_JITTER_S) * 1000
    assert refresh(initiated_by="user", ip="192.0.2.1").outcome == "circuit_open"
    assert sandbox.count("neonomics.balances") == 3
    assert [r["outcome"] for r in ledger(sql)] == ["server_error"] * 3  # not-sent reads are not counted
    assert account(sql)["balance"] == 55


def test_timeouts_count_and_keep_the_cached_balance(db, sql, sandbox, monkeypatch):
    from worker.settings import get_settings

    monkeypatch.setenv("DROP_PROVIDER_TIMEOUT_S", "0.3")
    get_settings.cache_clear()
    add_accounts(sql, sandbox, balance=42)
    sandbox.fault("neonomics.balances", timeout=True, hang_s=2, count=1)
    with pytest.raises(ProviderTimeout):
        refresh()
    assert [r["outcome"] for r in ledger(sql)] == ["timeout"]
    assert account(sql)["balance"] == 42


def test_a_failed_token_fetch_sends_no_balance_request_and_reserves_nothing(db, sql, sandbox):
    add_accounts(sql, sandbox)
    sandbox.fault("neonomics.token", status=503, count=1)
    with pytest.raises(ServerError):
        refresh()
    sandbox.fault("neonomics.token", status=401, count=1)
    with pytest.raises(AuthenticationError):
        refresh()
    assert sandbox.count("neonomics.balances") == 0 and ledger(sql) == []


# --- the quota ------------------------------------------------------------------------------------


def burst(account_id: str, now: datetime, *, threads: int = 4, per_thread: int = 3) -> list[str]:
    """`threads` event loops (own DB pools and HTTP clients, like separate workers), each racing
    `per_thread` refreshes of one account at the same instant."""
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker():
        async def many():
            return await asyncio.gather(*(aisp.refresh_handled(account_id, "scheduler", now=now)
                                          for _ in range(per_thread)))

        start.wait()
        results = run(many())
        with lock:
            outcomes.extend(r.outcome for r in results)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    return outcomes


def test_quota_under_concurrency_exactly_four_unattended_requests_per_rolling_24_hours(db, sql, sandbox):
    add_accounts(sql, sandbox)
    plan = [  # (hours after T0, reads that may still be sent)
        (0, 4),        # 12 racing refreshes: exactly 4 reach the bank
        (6, 0), (23.99, 0),
        (24.01, 4),    # the first four left the window
        (30, 0), (47, 0),
        (48.5, 4),
    ]
    expected_total = 0
    for hours, allowed in plan:
        outcomes = Counter(burst("ba-1", T0 + timedelta(hours=hours)))
        assert outcomes == Counter({"ok": allowed, "quota": 12 - allowed}), hours
        expected_total += allowed
        assert len(unattended(sandbox)) == expected_total  # counted at the bank, not by us
    times = [r["requested_at"] for r in ledger(sql)]
    assert len(times) == expected_total == 12
    for t in times:  # the rolling window, checked over the whole ledger
        assert sum(1 for s in times if t - rules.QUOTA_WINDOW < s <= t) <= 4


def test_user_reads_are_unlimited_carry_the_psu_ip_and_do_not_use_the_quota(db, sql, sandbox):
    add_accounts(sql, sandbox)
    for i in range(6):
        assert refresh(initiated_by="user", ip="203.0.113.7", now=T0 + timedelta(minutes=i)).outcome == "ok"
    assert [refresh(now=T0 + timedelta(hours=h)).outcome for h in (1, 2, 3, 4, 5)] == ["ok"] * 4 + ["quota"]
    reads = sandbox.requests("neonomics.balances")
    assert [r["psu_ip_address"] for r in reads] == [True] * 6 + [False] * 4
    assert Counter(r["initiated_by"] for r in ledger(sql)) == {"user": 6, "scheduler": 4}
    with pytest.raises(PermanentError, match="psu_ip_address is required"):
        refresh(initiated_by="user", ip=None)
    with pytest.raises(PermanentError, match="initiated_by"):
        refresh(initiated_by="robot")


def test_a_refusal_just_before_the_window_frees_comes_back_in_this_window(db, sql, sandbox):
    add_accounts(sql, sandbox)
    yesterday = T0 - timedelta(hours=24) + timedelta(seconds=40)  # yesterday's read ran 40 s later
    for h in (0, 6, 12, 18):
        assert refresh(now=yesterday + timedelta(hours=h)).outcome == "ok"
    result = refresh(now=T0)
    assert result.outcome == "quota"
    assert result.retry_at == yesterday + rules.QUOTA_WINDOW + timedelta(milliseconds=1)
    [job] = sql("SELECT job, payload, available_at FROM job_outbox")
    assert job == {"job": "aisp.refresh_account", "available_at": result.retry_at,
                   "payload": {"bank_account_id": "ba-1", "initiated_by": "scheduler"}}
    assert refresh(now=result.retry_at).outcome == "ok"


# --- fan-out ---------------------------------------------------------------------------------------


def per_account(rows):
    """account → (its batch row, the time it is due) from aisp.refresh_batch outbox rows."""
    due = {}
    for r in rows:
        for acct in r["payload"]["bank_account_ids"]:
            assert acct not in due, f"{acct} enqueued twice"
            due[acct] = (r, r["available_at"])
    return due


def test_fan_out_one_read_per_valid_consent_account_spread_by_a_stable_offset(db, sql):
    valid = add_accounts(sql, n=300, prefix="ok")
    add_accounts(sql, n=4, prefix="exp", consent_status="expired")
    add_accounts(sql, n=4, prefix="rel", needs_relink=True)
    add_accounts(sql, n=3, prefix="none", consent_id=None)
    paused = add_accounts(sql, n=2, prefix="p")
    sql("UPDATE bank_accounts SET aisp_paused_until = %s WHERE id = ANY(%s)", (T0 + timedelta(hours=2), paused))
    slot = datetime(2026, 3, 2, 5, 15, tzinfo=UTC)
    assert aisp_batch.fan_out(slot, spread_s=3600, chunk=64) == 300
    assert aisp_batch.fan_out(slot, spread_s=3600, chunk=64) == 0  # idempotent per (account, slot)
    rows = sql("SELECT job, payload, idempotency_key, available_at FROM job_outbox")
    due = per_account(rows)
    assert sorted(due) == sorted(valid)
    slot_text = slot.astimezone(rules.OSLO).isoformat()
    offsets = []
    for acct, (r, at) in due.items():
        assert r["job"] == "aisp.refresh_batch"
        assert r["payload"] == {"bank_account_ids": sorted(r["payload"]["bank_account_ids"]), "slot": slot_text}
        offset = (at - slot).total_seconds()
        first = r["payload"]["bank_account_ids"][0]
        assert r["idempotency_key"] == f"drop:aisp:batch:{slot_text}:{int(offset)}:{first}"
        assert offset == rules.stable_offset(acct, 3600)  # SQL and Python agree: each account its own second
        offsets.append(offset)
    buckets = Counter(int(o // 600) for o in offsets)  # six 10-minute buckets, 50 expected each
    assert len(buckets) == 6 and all(25 <= n <= 75 for n in buckets.values())
    # The next slot gives every account the same offset: its reads stay 6 h apart.
    later = slot + timedelta(hours=6)
    aisp_batch.fan_out(later, spread_s=3600)
    by_slot = {}
    for r in sql("SELECT payload, available_at FROM job_outbox"):
        for acct in r["payload"]["bank_account_ids"]:
            by_slot.setdefault(acct, []).append(r["available_at"])
    both = {a: sorted(at) for a, at in by_slot.items() if len(at) == 2}
    assert len(both) == 300 and all(at[1] - at[0] == timedelta(hours=6) for at in both.values())
    assert sorted(a for a, at in by_slot.items() if len(at) == 1) == paused  # their pause has ended


def test_fan_out_groups_accounts_due_in_the_same_second_up_to_the_batch_size(db, sql):
    valid = add_accounts(sql, n=250, prefix="b")
    slot = datetime(2026, 3, 2, 5, 15, tzinfo=UTC)
    assert aisp_batch.fan_out(slot, spread_s=0, batch_size=100) == 250  # all due at once: 100 + 100 + 50
    rows = sql("SELECT payload, available_at FROM job_outbox ORDER BY idempotency_key")
    assert sorted(len(r["payload"]["bank_account_ids"]) for r in rows) == [50, 100, 100]
    assert {r["available_at"] for r in rows} == {slot}
    assert sorted(per_account(rows)) == sorted(valid)
    sql("DELETE FROM job_outbox")
    assert aisp_batch.fan_out(slot, spread_s=60, batch_size=100) == 250  # one job per second that has accounts
    rows = sql("SELECT payload, available_at FROM job_outbox")
    assert len({r["available_at"] for r in rows}) == len(rows) <= 60


def test_scheduler_slot_to_balances_end_to_end_through_outbox_relay_and_worker(db, sql, sandbox, worker, relay,
                                                                             monkeypatch):
    ids = add_accounts(sql, sandbox, n=40, prefix="e2e")
    add_accounts(sql, sandbox, n=2, prefix="gone", consent_status="revoked")
    sandbox.set_account("acc-e2e-7", currency="SEK")
    now = datetime.now(UTC).replace(microsecond=0)
    jobs.enqueue("aisp.refresh_all", {"slot": now.isoformat(), "spread_s": 2}, idempotency_key="schedule:aisp:1")
    # A duplicated delivery of the same account's job must not make extra reads either.
    jobs.enqueue("aisp.refresh_account", {"bank_account_id": "e2e-1", "initiated_by": "scheduler"})
    wait_for(lambda: sql("SELECT count(*) AS n FROM bank_accounts WHERE balance IS NOT NULL")[0]["n"] == 39,
             timeout=20, what="39 balances stored")
    wait_for(lambda: sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 1, what="the SEK account dead-lettered")
    [dead] = sql("SELECT job, reason FROM dead_letters")
    assert dead == {"job": "aisp.refresh_account",
                    "reason": "CurrencyMismatchError: account currency NOK, provider balance in SEK"}
    wait_for(lambda: sql("""SELECT count(*) AS n FROM job_outbox
                             WHERE job = 'aisp.refresh_account' AND done_at IS NULL AND error IS NULL""")[0]["n"] == 0,
             what="outbox rows done")
    # The extra job reads e2e-1 once more if it runs while the batch's read is in flight, and not
    # at all if it ran first (the batch leaves out an account already read in its slot).
    reads = sandbox.count("neonomics.balances")
    assert reads in (40, 41), reads
    assert sorted({r["path"].split("/")[3] for r in sandbox.requests("neonomics.balances")}) == sorted(
        f"acc-{i}" for i in ids)
    assert sql("SELECT count(*) AS n FROM aisp_reads WHERE initiated_by = 'scheduler'")[0]["n"] == reads


# --- batches (aisp.refresh_batch) ---------------------------------------------------------------------

SLOT = datetime(2026, 3, 2, 5, 15, tzinfo=UTC)


def refresh_many(ids, now=T0, **kw):
    return run(aisp_batch.refresh_many(ids, SLOT, now=now, **kw))


def test_a_batch_keeps_each_accounts_outcome_its_own_and_a_redelivery_reads_nothing_twice(db, sql, sandbox):
    ids = add_accounts(sql, sandbox, n=4, prefix="b", balance=7)
    sandbox.expire_consent("acc-b-2", "CONSENT_EXPIRED")
    sandbox.set_account("acc-b-3", currency="SEK")
    [outbox] = sql("""INSERT INTO job_outbox (job, payload, idempotency_key)
                      VALUES ('aisp.refresh_batch', '{}', 'k') RETURNING id""")
    result = refresh_many(ids, outbox_id=outbox["id"])
    assert result.outcomes == {"b-1": "ok", "b-2": "consent_error", "b-3": "currency_mismatch", "b-4": "ok"}
    balances = {r["id"]: (r["balance"], r["needs_relink"]) for r in sql("SELECT * FROM bank_accounts")}
    assert balances["b-2"] == (7, True) and balances["b-3"] == (7, False)
    assert balances["b-1"][0] == balances["b-4"][0] != 7  # read and stored, unaffected by the others
    [dead] = sql("SELECT job, reason, message FROM dead_letters")
    assert dead["job"] == "aisp.refresh_account" and dead["reason"].startswith("CurrencyMismatchError")
    assert dead["message"]["kwargs"]["bank_account_id"] == "b-3"
    assert sql("SELECT done_at IS NOT NULL AS done FROM job_outbox WHERE id = %s", (outbox["id"],)) == [{"done": True}]
    # The same batch delivered again (worker killed before its ack): nothing is read twice.
    assert set(refresh_many(ids, now=T0 + timedelta(seconds=5)).outcomes.values()) == {"already_read"}
    assert sandbox.count("neonomics.balances") == 4
    assert sorted(r["outcome"] for r in sql("SELECT outcome FROM aisp_reads")) == [
        "consent_error", "currency_mismatch", "ok", "ok"]


def test_a_transient_failure_in_a_batch_becomes_that_accounts_own_retry_job(db, sql, sandbox):
    add_accounts(sql, sandbox, balance=5)
    sandbox.fault("neonomics.balances", status=503, count=1)
    assert refresh_many(["ba-1"]).outcomes == {"ba-1": "server_error"}
    [job] = sql("SELECT job, payload, idempotency_key FROM job_outbox")
    slot_text = SLOT.astimezone(rules.OSLO).isoformat()
    assert job == {"job": "aisp.refresh_account", "idempotency_key": f"drop:aisp:ba-1:{slot_text}",
                   "payload": {"bank_account_id": "ba-1", "initiated_by": "scheduler", "slot": slot_text}}
    assert account(sql)["balance"] == 5  # cached balance untouched; the retry reserves again
    assert [r["outcome"] for r in ledger(sql)] == ["server_error"]


def test_a_batch_respects_the_quota_per_account(db, sql, sandbox):
    ids = add_accounts(sql, sandbox, n=2, prefix="q")
    for h in (-18, -12, -6):
        assert refresh("q-1", now=T0 + timedelta(hours=h, minutes=-1)).outcome == "ok"
    assert refresh("q-1", now=SLOT - timedelta(minutes=1)).outcome == "ok"  # four in the last 24 h
    assert refresh_many(ids).outcomes == {"q-1": "quota", "q-2": "ok"}
    assert len(unattended(sandbox)) == 5
