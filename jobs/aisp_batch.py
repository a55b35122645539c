"""Job family aisp, many accounts at a time: the 4-a-day fan-out (`aisp.refresh_all`) and its
unit of work (`aisp.refresh_batch`, up to BATCH_SIZE accounts read together). The rules and the
single read they share are jobs/aisp.py's; see docs/aisp.md."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dramatiq.middleware import CurrentMessage
from psycopg.types.json import Jsonb

from db import outbox
from db.outbox import INTERNAL_PRODUCER_CTE
from db.pool import get_async_pool, one_row, transaction
from jobs import aisp
from jobs import aisp_rules as rules
from jobs.registry import HIGH_VOLUME_TRACES, registry
from worker.context import note_outbox_done
from worker.middleware import dead_letter_job
from worker.providers.errors import (
    CircuitOpenError,
    ProviderError,
)
from worker.providers.neonomics import get_async_neonomics
from worker.retry import FIRST_BACKOFF_MS, PermanentError, is_transient

log = logging.getLogger(__name__)


# --- many accounts per message (the fan-out's unit of work) --------------------------------------

# Reserve for every account of a batch in one round trip: the same aisp_reserve_read() per
# account (row lock, fresh-snapshot count, ledger row), called in id order. Accounts that already
# have a finished scheduler read in this slot are left out first (a redelivered batch — worker
# crash, Redis loss — does not read them again); MATERIALIZED so that filter runs before any
# reservation is made.
_RESERVE_MANY = """
WITH todo AS MATERIALIZED (
    SELECT a.id, a.request_id, a.ord
      FROM unnest(%(ids)s::text[], %(request_ids)s::text[]) WITH ORDINALITY AS a(id, request_id, ord)
     WHERE NOT EXISTS (SELECT 1 FROM aisp_reads x
                        WHERE x.bank_account_id = a.id AND x.initiated_by = 'scheduler'
                          AND x.requested_at >= %(slot)s AND x.outcome IS NOT NULL)
)
SELECT t.id AS bank_account_id, t.request_id, r.*
  FROM todo t CROSS JOIN LATERAL aisp_reserve_read(t.id, 'scheduler', %(now)s, t.request_id, %(limit)s,
                                                   %(window)s) r
 ORDER BY t.ord
"""

# Every successful read of a batch, and the batch's outbox row, in one statement. Same rules as
# _APPLY_OK: stored only for the consent it was read with, never over a newer sync.
_APPLY_MANY = f"""
WITH v AS (SELECT * FROM unnest(%(read_ids)s::bigint[], %(ids)s::text[], %(ore)s::bigint[],
                                %(consent_ids)s::text[]) AS v(read_id, id, ore, consent_id)),
     r AS (UPDATE aisp_reads a SET outcome = 'ok', http_status = 200 FROM v WHERE a.id = v.read_id),
     o AS ({outbox.MARK_DONE_BY_NAME})
UPDATE bank_accounts b
   SET balance = v.ore, balance_synced_at = %(now)s, updated_at = now()
  FROM v
 WHERE b.id = v.id AND b.consent_id = v.consent_id
   AND (b.balance_synced_at IS NULL OR b.balance_synced_at <= %(now)s)
"""

# A read of a batch that should run again (transient error, breaker open): its own job, from
# PostgreSQL, with the per-account key the fan-out used to use (so at most one per slot).
_HAND_OFF = f"""
WITH {INTERNAL_PRODUCER_CTE}
{outbox.INSERT_COLUMNS}
SELECT %(job)s, %(payload)s, %(key)s, now() + make_interval(secs => %(delay_s)s) FROM producer
ON CONFLICT (idempotency_key) DO NOTHING
"""


@dataclass(frozen=True)
class BatchResult:
    outcomes: dict[str, str]  # bank_account_id → outcome (as RefreshResult.outcome)


def _check_batch(bank_account_ids: object) -> list[str]:
    if not isinstance(bank_account_ids, list) or not bank_account_ids:
        raise PermanentError("bank_account_ids must be a non-empty list")
    if len(bank_account_ids) > aisp.MAX_BATCH_SIZE:
        raise PermanentError(f"at most {aisp.MAX_BATCH_SIZE} bank_account_ids per batch")
    if not all(isinstance(i, str) and i for i in bank_account_ids):
        raise PermanentError("bank_account_ids must be non-empty strings")
    return sorted(set(bank_account_ids))  # id order: row locks are always taken in one order


async def refresh_many(bank_account_ids: list[str], slot: datetime, *, now: datetime | None = None,
                       outbox_id: int | None = None) -> BatchResult:
    """Scheduler reads of many accounts: one reserve statement, the requests concurrently on this
    loop, one apply statement for the successes. Each account keeps its own quota check, ledger
    row and outcome; a failure of one account never touches another's (its error handling is
    jobs.aisp.refresh()'s, per account). Nothing is raised for one account: transient failures and breaker
    waits become a per-account `aisp.refresh_account` job, permanent ones a per-account dead letter."""
    ids = _check_batch(bank_account_ids)
    now = now or aisp.clock()
    client = get_async_neonomics()
    # The token first: if it cannot be had, nothing is reserved and the whole message retries.
    await client.access_token()
    request_ids = [str(uuid.uuid4()) for _ in ids]
    pool = await get_async_pool(name="drop-aisp")
    async with pool.connection() as conn:
        cur = await conn.execute(_RESERVE_MANY, {"ids": ids, "request_ids": request_ids, "slot": slot, "now": now,
                                                 "limit": rules.QUOTA_LIMIT, "window": rules.QUOTA_WINDOW})
        rows = await cur.fetchall()
    outcomes = dict.fromkeys(ids, "already_read")
    reads = []
    for row in rows:
        if row["refusal"] is not None:
            refusal = await aisp.refused(row, row["bank_account_id"], "scheduler", now)
            outcomes[row["bank_account_id"]] = refusal.outcome
        else:
            reads.append(row)
    # One breaker admission for the batch while it is closed (the requests leave together anyway).
    admitted = bool(reads) and client.admit_many()
    results = await asyncio.gather(*(_read_of_batch(client, row, now, slot, admitted) for row in reads))
    ok = [(row, ore) for row, (outcome, ore) in zip(reads, results, strict=True) if outcome == "ok"]
    for row, (outcome, _) in zip(reads, results, strict=True):
        outcomes[row["bank_account_id"]] = outcome
    await aisp.fetch_one(_APPLY_MANY, {
        "read_ids": [r["read_id"] for r, _ in ok], "ids": [r["bank_account_id"] for r, _ in ok],
        "ore": [ore for _, ore in ok], "consent_ids": [r["consent_id"] for r, _ in ok],
        "outbox_id": outbox_id, "now": now})
    if ok:
        aisp.READS.labels("ok", "scheduler").inc(len(ok))
    return BatchResult(outcomes)


async def _read_of_batch(client: Any, row: dict[str, Any], now: datetime, slot: datetime,
                         admitted: bool) -> tuple[str, int | None]:
    """One account's read inside a batch: ("ok", øre) to apply, or its handled outcome."""
    bank_account_id, read_id, request_id = row["bank_account_id"], row["read_id"], row["request_id"]
    try:
        balances = await client.get_balances(row["provider_account_id"], row["consent_id"], request_id=request_id,
                                             admitted=admitted)
        balance = rules.choose_balance(balances.balances)
        rules.check_currency(row["currency"], balance)
        return "ok", balance.amount_ore
    except CircuitOpenError as exc:
        # Nothing was sent: the reservation goes back; the account waits for the breaker.
        await aisp.fetch_one("DELETE FROM aisp_reads WHERE id = %s", (read_id,))
        aisp.SKIPPED.labels("circuit_open", "scheduler").inc()
        wait_s = exc.retry_after_s + random.uniform(1.0, aisp.CIRCUIT_JITTER_S)
        if now + timedelta(seconds=wait_s) < rules.next_window_start(now):
            await _hand_off(bank_account_id, slot, wait_s)
        return "circuit_open", None
    except ProviderError as exc:
        if exc.operation == "token":  # a token refresh after a 401 failed: the request never left
            await aisp.fetch_one("DELETE FROM aisp_reads WHERE id = %s", (read_id,))
            await _after_failure(bank_account_id, slot, exc)
            return "token_error", None
        failure: Exception = exc
    except (rules.CurrencyMismatchError, rules.NoUsableBalanceError) as exc:
        failure = exc
    handled = await aisp.record_failure(row, read_id, bank_account_id, "scheduler", now, request_id, failure, None)
    if not isinstance(handled, Exception):
        return handled, None
    await _after_failure(bank_account_id, slot, handled)  # what a single job would raise: alone, or dead
    return aisp.outcome_for(failure), None


async def _hand_off(bank_account_id: str, slot: datetime, delay_s: float) -> None:
    slot_text = slot.astimezone(rules.OSLO).isoformat()
    key = f"drop:aisp:{bank_account_id}:{slot_text}"
    await aisp.fetch_one(_HAND_OFF, {"job": aisp.REFRESH_ACCOUNT, "key": key, "delay_s": delay_s,
                           "payload": Jsonb({"bank_account_id": bank_account_id, "initiated_by": "scheduler",
                                             "slot": slot_text})})


async def _after_failure(bank_account_id: str, slot: datetime, exc: BaseException) -> None:
    """As Dramatiq would treat a single job raising `exc`: transient → a retry (its own job,
    after the first backoff, then Dramatiq's retries), else a dead letter for that account."""
    if is_transient(exc):
        await _hand_off(bank_account_id, slot, FIRST_BACKOFF_MS / 1000 * random.uniform(1.0, 1.5))
        return

    kwargs = {"bank_account_id": bank_account_id, "initiated_by": "scheduler",
              "slot": slot.astimezone(rules.OSLO).isoformat()}
    await asyncio.get_running_loop().run_in_executor(None, dead_letter_job, aisp.REFRESH_ACCOUNT, aisp.QUEUE,
                                                     kwargs, exc)


@registry.job(aisp.REFRESH_BATCH, queue=aisp.QUEUE, time_limit=120_000, traces_share=HIGH_VOLUME_TRACES)
def refresh_batch(bank_account_ids: list[str], slot: str) -> None:
    """The fan-out's job: scheduler reads of the accounts due in one second of the slot."""
    message = CurrentMessage.get_current_message()
    outbox_id = message.options.get("outbox_id") if message is not None else None
    aisp.run_coroutine(refresh_many(bank_account_ids, parse_slot(slot), outbox_id=outbox_id))
    if outbox_id is not None:
        note_outbox_done()  # the apply statement marked it


# --- fan-out -------------------------------------------------------------------------------------

# The offset in SQL: the same as rules.stable_offset (first 60 bits of md5(id)) mod spread.
OFFSET_SQL = "(('x' || substr(md5(id), 1, 15))::bit(60)::bigint %% %(spread)s)"

# One chunk of accounts (keyset, id order) → one outbox row per (offset second, up to BATCH_SIZE
# accounts): `aisp.refresh_batch {bank_account_ids, slot}`, available at slot + that offset.
_FANOUT = f"""
WITH {INTERNAL_PRODUCER_CTE}, batch AS (
    SELECT id FROM bank_accounts
     WHERE consent_status = 'valid' AND needs_relink = false AND consent_id IS NOT NULL
       AND (aisp_paused_until IS NULL OR aisp_paused_until <= %(slot_ts)s)
       AND id > %(after)s
     ORDER BY id
     LIMIT %(chunk)s
), placed AS (
    SELECT id, {OFFSET_SQL} AS off FROM batch
), grouped AS (
    SELECT id, off, (row_number() OVER (PARTITION BY off ORDER BY id) - 1) / %(batch_size)s AS part FROM placed
), ins AS (
    {outbox.INSERT_COLUMNS}
    SELECT %(job)s,
           jsonb_build_object('bank_account_ids', jsonb_agg(id ORDER BY id), 'slot', %(slot)s::text),
           'drop:aisp:batch:' || %(slot)s::text || ':' || off || ':' || min(id),
           %(slot_ts)s + make_interval(secs => off)
      FROM grouped, producer
     GROUP BY off, part
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING jsonb_array_length(payload->'bank_account_ids') AS n
)
SELECT (SELECT max(id) FROM batch) AS last_id, (SELECT count(*) FROM batch) AS scanned,
       (SELECT coalesce(sum(n), 0) FROM ins) AS inserted, (SELECT count(*) FROM ins) AS messages
"""


def parse_slot(slot: str | None) -> datetime:
    if slot is None:
        return aisp.clock().replace(microsecond=0)
    try:
        parsed = datetime.fromisoformat(slot)
    except (TypeError, ValueError):
        raise PermanentError("slot is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise PermanentError("slot needs a UTC offset")
    return parsed


def fan_out(slot: datetime, *, spread_s: int = rules.DEFAULT_SPREAD_S, chunk: int = aisp.FANOUT_CHUNK,
            batch_size: int = aisp.BATCH_SIZE) -> int:
    """Enqueue a refresh of every valid-consent account for `slot`; return how many accounts
    were newly enqueued.

    Each account is due at slot + its stable offset; the accounts due in the same second are
    grouped into `aisp.refresh_batch` jobs of at most `batch_size`. Keyset chunks, each one
    `INSERT … SELECT` in its own short transaction; idempotent (keys
    `aisp:batch:<slot>:<offset>:<first account>`), so a re-run or a crash half-way enqueues
    nothing twice."""

    slot_text = slot.astimezone(rules.OSLO).isoformat()
    after, total = "", 0
    while True:
        with transaction() as conn:
            row = one_row(conn.execute(_FANOUT, {
                "slot_ts": slot, "slot": slot_text, "after": after, "chunk": chunk, "spread": max(spread_s, 1),
                "job": aisp.REFRESH_BATCH, "batch_size": max(1, min(batch_size, aisp.MAX_BATCH_SIZE))}).fetchone())
        total += row["inserted"]
        if row["scanned"] < chunk:
            break
        after = row["last_id"]
    aisp.FANOUT_JOBS.inc(total)
    log.info("aisp fan-out for slot %s: %d refreshes over %d s", slot_text, total, spread_s)
    return total


@registry.job("aisp.refresh_all", queue=aisp.QUEUE, time_limit=600_000)
def refresh_all(slot: str | None = None, spread_s: int | None = None) -> None:
    try:
        spread = rules.clamp_spread(spread_s)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    fan_out(parse_slot(slot), spread_s=spread)
