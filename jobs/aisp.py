"""AISP: the 4-a-day unattended balance refresh and user-initiated balance reads.

Jobs (names and payloads are the enqueue contract, docs/aisp.md):

- `aisp.refresh_all {slot?, spread_s?}` (scheduler, 4 slots a day): one outbox row
  `aisp.refresh_account {bank_account_id, initiated_by: "scheduler", slot}` per account with a
  valid consent, `available_at = slot + stable per-account offset`, idempotency key
  `aisp:<bank_account_id>:<slot>`. Inserted in bulk (`INSERT … SELECT`, keyset chunks): no
  round trip per account, and PostgreSQL holds the delayed work, so losing Redis loses nothing.
- `aisp.refresh_account {bank_account_id, initiated_by, psu_ip_address?, slot?}`: one read.

The PSD2 quota (at most 4 unattended reads per account in any 24 h) is enforced by
`aisp_reserve_read()` (migration 0004): the ledger row is reserved in the same transaction that
locked the account and counted its reads, before the request is sent. Every request sent keeps
its row, success or failure; a request that was provably not sent (breaker open, token fetch
failed) gives its reservation back. Retries reserve again, so they fit the quota too.

Throughput: the read runs as a coroutine on the worker process's Dramatiq AsyncIO event loop,
with one shared async httpx client and one async PostgreSQL pool per loop, and two short
single-round-trip statements (reserve, apply) per read.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import CurrentMessage
from prometheus_client import Counter
from psycopg.types.json import Jsonb

from db import outbox
from db.outbox import INTERNAL_PRODUCER_CTE
from db.pool import close_async_pool, get_async_pool, one_row, transaction  # noqa: F401  (close_async_pool: for callers)
from jobs import aisp_rules as rules
from jobs.registry import registry
from worker.context import note_outbox_done
from worker.middleware import dead_letter_job
from worker.outcomes import RunLater
from worker.providers.errors import (
    AccessExceededError,
    AuthenticationError,
    CircuitOpenError,
    ClientError,
    ConsentError,
    MalformedResponseError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    ServerError,
    UnexpectedStatusError,
)
from worker.providers.neonomics import get_async_neonomics
from worker.retry import FIRST_BACKOFF_MS, PermanentError, is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")
# worker.logs.setup_logging() silences httpx's per-request INFO line, but worker processes
# started by the `dramatiq` CLI never call it: at 1000 reads/s that line alone costs a core.
logging.getLogger("httpx").setLevel(max(logging.getLogger("httpx").level, logging.WARNING))

QUEUE = "aisp"
REFRESH_ACCOUNT = "aisp.refresh_account"
REFRESH_BATCH = "aisp.refresh_batch"
# Accounts per aisp.refresh_batch message (the fan-out groups accounts due in the same second).
BATCH_SIZE = 100
MAX_BATCH_SIZE = 1000
# Outcomes whose statement already marked the job's outbox row done (refresh()'s apply, _failed).
MARKS_OUTBOX = frozenset({"ok", "consent_error", "access_exceeded"})
INITIATORS = ("scheduler", "user")
FANOUT_CHUNK = 10_000
RELINK_MESSAGE = "Koblingen til banken din har utløpt. Vennligst koble til kontoen på nytt."
CIRCUIT_JITTER_S = 30.0

READS = Counter(
    "drop_aisp_reads_total", "AISP balance requests sent to the provider, by outcome", ["outcome", "initiated_by"]
)
QUOTA_REFUSALS = Counter(
    "drop_aisp_quota_refusals_total",
    "Unattended reads not sent: PSD2 quota full (quota) or the bank said 429 this window (paused)",
    ["reason"],
)
CONSENTS_EXPIRED = Counter(
    "drop_aisp_consents_expired_total", "Consents a balance read found expired/invalid/unknown", ["code"]
)
SKIPPED = Counter("drop_aisp_skipped_total", "Refreshes not sent for another reason", ["reason", "initiated_by"])
FANOUT_JOBS = Counter("drop_aisp_fanout_jobs_total",
                      "Account refreshes enqueued by aisp.refresh_all (grouped in aisp.refresh_batch jobs)")


def _utcnow() -> datetime:
    return datetime.now(UTC)


# Injectable time: tests set `jobs.aisp.clock` to move across the 24 h window without waiting.
clock: Callable[[], datetime] = _utcnow


@dataclass(frozen=True)
class RefreshResult:
    outcome: str  # ok | quota | paused | no_consent | unknown_account | circuit_open | <error outcome>
    read_id: int | None = None
    balance_ore: int | None = None
    retry_at: datetime | None = None
    run_later_ms: int | None = None  # breaker open: the scheduled read runs again after this long


class AispReadError(PermanentError):
    """A read whose answer we refuse to store (recorded in aisp_reads; dead-lettered, no retry)."""


async def _one(sql: str, params: tuple | dict) -> dict[str, Any] | None:
    pool = await get_async_pool(name="drop-aisp")
    async with pool.connection() as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchone() if cur.description else None


# --- one read ------------------------------------------------------------------------------------

_RESERVE = "SELECT * FROM aisp_reserve_read(%s, %s, %s, %s, %s, %s)"

# Success: ledger outcome, cached balance and the outbox row, in one statement (one transaction).
# The balance is only stored for the consent it was read with, and never over a newer one.
_APPLY_OK = f"""
WITH r AS (UPDATE aisp_reads SET outcome = 'ok', http_status = 200 WHERE id = %(read_id)s),
     o AS ({outbox.MARK_DONE_BY_NAME})
UPDATE bank_accounts
   SET balance = %(ore)s, balance_synced_at = %(now)s, updated_at = now()
 WHERE id = %(id)s AND consent_id = %(consent_id)s
   AND (balance_synced_at IS NULL OR balance_synced_at <= %(now)s)
"""

_RECORD = "UPDATE aisp_reads SET outcome = %s, http_status = %s, error_code = %s WHERE id = %s"


def outcome_for(exc: BaseException) -> str:
    """The ledger/metric outcome of a failed read (codes only, no PII)."""
    for kind, name in (
        (ConsentError, "consent_error"), (AccessExceededError, "access_exceeded"), (ServerError, "server_error"),
        (ProviderTimeout, "timeout"), (ProviderConnectionError, "connection_error"), (NotFoundError, "not_found"),
        (AuthenticationError, "auth_error"), (MalformedResponseError, "malformed"), (ClientError, "client_error"),
        (UnexpectedStatusError, "unexpected_status"), (rules.CurrencyMismatchError, "currency_mismatch"),
        (rules.NoUsableBalanceError, "no_balance"),
    ):
        if isinstance(exc, kind):
            return name
    return "error"


async def refresh(
    bank_account_id: str,
    initiated_by: str = "scheduler",
    psu_ip_address: str | None = None,
    *,
    now: datetime | None = None,
    outbox_id: int | None = None,
) -> RefreshResult:
    """Reserve (quota), read, apply. Raises transient errors for Dramatiq to retry (each retry
    reserves again), permanent ones to dead-letter; handled answers (consent, 429) and an open
    breaker (with `run_later_ms` for a scheduled read) are results."""
    if initiated_by not in INITIATORS:
        raise PermanentError(f"initiated_by must be one of {', '.join(INITIATORS)}")
    if not isinstance(bank_account_id, str) or not bank_account_id:
        raise PermanentError("bank_account_id must be a non-empty string")
    psu_ip = None
    if initiated_by == "user":
        try:
            psu_ip = rules.valid_psu_ip(psu_ip_address)
        except ValueError as exc:
            raise PermanentError(str(exc)) from None
    now = now or clock()
    request_id = str(uuid.uuid4())
    row = await _one(_RESERVE, (bank_account_id, initiated_by, now, request_id, rules.QUOTA_LIMIT,
                                rules.QUOTA_WINDOW))
    assert row is not None
    if row["refusal"] is not None:
        return await _refused(row, bank_account_id, initiated_by, now)

    read_id = row["read_id"]
    failure: Exception | None = None
    try:
        balances = await get_async_neonomics().get_balances(
            row["provider_account_id"], row["consent_id"], psu_ip=psu_ip, request_id=request_id
        )
        balance = rules.choose_balance(balances.balances)
        rules.check_currency(row["currency"], balance)
    except CircuitOpenError as exc:
        return await _not_sent(read_id, bank_account_id, initiated_by, now, exc)
    except ProviderError as exc:
        if exc.operation == "token":  # the balance request itself never left
            await _one("DELETE FROM aisp_reads WHERE id = %s", (read_id,))
            raise
        failure = exc
    except (rules.CurrencyMismatchError, rules.NoUsableBalanceError) as exc:
        failure = exc
    if failure is not None:
        handled = await _failed(row, read_id, bank_account_id, initiated_by, now, request_id, failure, outbox_id)
        if isinstance(handled, Exception):
            raise handled from None
        return RefreshResult(handled)

    await _one(_APPLY_OK, {"read_id": read_id, "outbox_id": outbox_id, "ore": balance.amount_ore, "now": now,
                           "id": bank_account_id, "consent_id": row["consent_id"]})
    READS.labels("ok", initiated_by).inc()
    return RefreshResult("ok", read_id, balance.amount_ore)


async def _refused(row: dict[str, Any], bank_account_id: str, initiated_by: str, now: datetime) -> RefreshResult:
    reason = row["refusal"]
    if reason in ("quota", "paused"):
        QUOTA_REFUSALS.labels(reason).inc()
    else:
        SKIPPED.labels(reason, initiated_by).inc()
    retry_at = None
    if reason == "quota" and row["oldest_in_window"] is not None:
        # Yesterday's read of this slot may have run a little later than today's (queueing), or
        # a DST night shortened the day: come back once the oldest read leaves the window, if
        # that is still within this refresh window.
        decision = rules.quota_decision([row["oldest_in_window"]], now, limit=1)
        retry_at = rules.retry_within_window(decision.retry_at, now)
        if retry_at is not None:
            key = f"drop:aisp:{bank_account_id}:retry:{retry_at.isoformat()}"
            await _one(
                f"""WITH {INTERNAL_PRODUCER_CTE}
                    {outbox.INSERT_COLUMNS}
                    SELECT %s, %s, %s, %s FROM producer ON CONFLICT (idempotency_key) DO NOTHING""",
                (REFRESH_ACCOUNT, Jsonb({"bank_account_id": bank_account_id, "initiated_by": "scheduler"}), key,
                 retry_at),
            )
    log.info("aisp read of %s not sent: %s", bank_account_id, reason)
    return RefreshResult(reason, retry_at=retry_at)


async def _not_sent(read_id: int, bank_account_id: str, initiated_by: str, now: datetime,
                    exc: CircuitOpenError) -> RefreshResult:
    """Breaker open: no request left, so the reservation is given back; the cached balance stays."""
    await _one("DELETE FROM aisp_reads WHERE id = %s", (read_id,))
    SKIPPED.labels("circuit_open", initiated_by).inc()
    if initiated_by == "scheduler":
        wait_s = exc.retry_after_s + random.uniform(1.0, CIRCUIT_JITTER_S)  # no herd at half-open
        if now + timedelta(seconds=wait_s) < rules.next_window_start(now):
            return RefreshResult("circuit_open", run_later_ms=int(wait_s * 1000))
    return RefreshResult("circuit_open")


async def _failed(row: dict[str, Any], read_id: int, bank_account_id: str, initiated_by: str, now: datetime,
                  request_id: str, exc: Exception, outbox_id: int | None) -> str | Exception:
    """Record a failed read (it counts) and its consequences; return the outcome of a handled
    answer (consent, 429), or the error the job must raise (retried or dead-lettered)."""
    outcome = outcome_for(exc)
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    READS.labels(outcome, initiated_by).inc()
    pool = await get_async_pool(name="drop-aisp")
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(_RECORD, (outcome, status, code, read_id))
        if isinstance(exc, ConsentError):
            # Stop reading this account until the user re-links it; notify and audit once.
            status_after = "expired" if exc.code == "CONSENT_EXPIRED" else "revoked"
            cur = await conn.execute(
                """UPDATE bank_accounts SET consent_id = NULL, consent_status = %s, needs_relink = true,
                          updated_at = now()
                    WHERE id = %s AND consent_id = %s RETURNING user_id""",
                (status_after, bank_account_id, row["consent_id"]),
            )
            changed = await cur.fetchone()
            if changed is not None:
                CONSENTS_EXPIRED.labels(exc.code or "unknown").inc()
                await conn.execute(
                    "INSERT INTO notifications (user_id, kind, message) VALUES (%s, 'bank_relink', %s)",
                    (changed["user_id"], RELINK_MESSAGE),
                )
                await _audit(conn, changed["user_id"], "aisp.consent_expired", bank_account_id, request_id,
                             initiated_by, code=exc.code, consent_status=status_after)
        elif isinstance(exc, AccessExceededError):
            until = rules.pause_until(now, exc.retry_after_s)
            await conn.execute(
                """UPDATE bank_accounts SET aisp_paused_until = GREATEST(COALESCE(aisp_paused_until, %s), %s)
                    WHERE id = %s""",
                (until, until, bank_account_id),
            )
            await _audit(conn, row["user_id"], "aisp.access_exceeded", bank_account_id, request_id, initiated_by,
                         paused_until=until.isoformat())
        elif isinstance(exc, rules.CurrencyMismatchError):
            await _audit(conn, row["user_id"], "aisp.currency_mismatch", bank_account_id, request_id, initiated_by,
                         account_currency=exc.account_currency, provider_currency=exc.provider_currency)
        if isinstance(exc, ConsentError | AccessExceededError) and outbox_id is not None:
            # A clear, final outcome: done with its effects (cached balance untouched).
            await conn.execute(outbox.MARK_DONE_BY_NAME, {"outbox_id": outbox_id})
    log.warning("aisp read of %s failed: %s", bank_account_id, outcome)
    if isinstance(exc, ConsentError | AccessExceededError):
        return outcome
    if isinstance(exc, MalformedResponseError):
        # Its message may quote the provider's amount: the dead letter keeps only codes.
        return AispReadError(f"malformed balances answer (HTTP {status})")
    return exc


async def _audit(conn: Any, user_id: str | None, action: str, bank_account_id: str, request_id: str,
                 initiated_by: str, **details: Any) -> None:
    await conn.execute(
        "INSERT INTO audit_log (user_id, action, details) VALUES (%s, %s, %s)",
        (user_id, action, Jsonb({"bank_account_id": bank_account_id, "request_id": request_id,
                                 "initiated_by": initiated_by, **details})),
    )


async def refresh_handled(bank_account_id: str, initiated_by: str = "scheduler", psu_ip_address: str | None = None,
                          *, now: datetime | None = None, outbox_id: int | None = None) -> RefreshResult:
    """`refresh` (kept under this name for callers: handled answers are results in both)."""
    return await refresh(bank_account_id, initiated_by, psu_ip_address, now=now, outbox_id=outbox_id)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run on the worker's AsyncIO event loop (like an `async def` actor); asyncio.run outside one."""
    loop_thread = get_event_loop_thread()
    if loop_thread is None:
        return asyncio.run(coro)
    return loop_thread.run_coroutine(coro)


# A sync shell around the coroutine, run on Dramatiq's event loop exactly as an `async def` actor
# would be: the shell reads the message's outbox id in the worker thread, where CurrentMessage's
# context variable is set (it is not visible on the loop thread).
@registry.job(REFRESH_ACCOUNT, queue=QUEUE, time_limit=90_000)
def refresh_account(bank_account_id: str, initiated_by: str = "scheduler", psu_ip_address: str | None = None,
                    slot: str | None = None) -> RunLater | None:
    message = CurrentMessage.get_current_message()
    outbox_id = message.options.get("outbox_id") if message is not None else None
    result = run_coroutine(refresh(bank_account_id, initiated_by, psu_ip_address, outbox_id=outbox_id))
    if result.run_later_ms is not None:
        return RunLater(result.run_later_ms, "neonomics circuit open")
    if outbox_id is not None and result.outcome in MARKS_OUTBOX:
        note_outbox_done()  # marked in the apply's own (committed) statement: no second transaction
    return None


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
    if len(bank_account_ids) > MAX_BATCH_SIZE:
        raise PermanentError(f"at most {MAX_BATCH_SIZE} bank_account_ids per batch")
    if not all(isinstance(i, str) and i for i in bank_account_ids):
        raise PermanentError("bank_account_ids must be non-empty strings")
    return sorted(set(bank_account_ids))  # id order: row locks are always taken in one order


async def refresh_many(bank_account_ids: list[str], slot: datetime, *, now: datetime | None = None,
                       outbox_id: int | None = None) -> BatchResult:
    """Scheduler reads of many accounts: one reserve statement, the requests concurrently on this
    loop, one apply statement for the successes. Each account keeps its own quota check, ledger
    row and outcome; a failure of one account never touches another's (its error handling is
    refresh()'s, per account). Nothing is raised for one account: transient failures and breaker
    waits become a per-account `aisp.refresh_account` job, permanent ones a per-account dead letter."""
    ids = _check_batch(bank_account_ids)
    now = now or clock()
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
            outcomes[row["bank_account_id"]] = (await _refused(row, row["bank_account_id"], "scheduler", now)).outcome
        else:
            reads.append(row)
    # One breaker admission for the batch while it is closed (the requests leave together anyway).
    admitted = bool(reads) and client.admit_many()
    results = await asyncio.gather(*(_read_of_batch(client, row, now, slot, admitted) for row in reads))
    ok = [(row, ore) for row, (outcome, ore) in zip(reads, results, strict=True) if outcome == "ok"]
    for row, (outcome, _) in zip(reads, results, strict=True):
        outcomes[row["bank_account_id"]] = outcome
    await _one(_APPLY_MANY, {"read_ids": [r["read_id"] for r, _ in ok], "ids": [r["bank_account_id"] for r, _ in ok],
                             "ore": [ore for _, ore in ok], "consent_ids": [r["consent_id"] for r, _ in ok],
                             "outbox_id": outbox_id, "now": now})
    if ok:
        READS.labels("ok", "scheduler").inc(len(ok))
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
        await _one("DELETE FROM aisp_reads WHERE id = %s", (read_id,))
        SKIPPED.labels("circuit_open", "scheduler").inc()
        wait_s = exc.retry_after_s + random.uniform(1.0, CIRCUIT_JITTER_S)
        if now + timedelta(seconds=wait_s) < rules.next_window_start(now):
            await _hand_off(bank_account_id, slot, wait_s)
        return "circuit_open", None
    except ProviderError as exc:
        if exc.operation == "token":  # a token refresh after a 401 failed: the request never left
            await _one("DELETE FROM aisp_reads WHERE id = %s", (read_id,))
            await _after_failure(bank_account_id, slot, exc)
            return "token_error", None
        failure: Exception = exc
    except (rules.CurrencyMismatchError, rules.NoUsableBalanceError) as exc:
        failure = exc
    handled = await _failed(row, read_id, bank_account_id, "scheduler", now, request_id, failure, None)
    if not isinstance(handled, Exception):
        return handled, None
    await _after_failure(bank_account_id, slot, handled)  # what a single job would raise: alone, or dead
    return outcome_for(failure), None


async def _hand_off(bank_account_id: str, slot: datetime, delay_s: float) -> None:
    slot_text = slot.astimezone(rules.OSLO).isoformat()
    key = f"drop:aisp:{bank_account_id}:{slot_text}"
    await _one(_HAND_OFF, {"job": REFRESH_ACCOUNT, "key": key, "delay_s": delay_s,
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
    await asyncio.get_running_loop().run_in_executor(None, dead_letter_job, REFRESH_ACCOUNT, QUEUE, kwargs, exc)


@registry.job(REFRESH_BATCH, queue=QUEUE, time_limit=120_000)
def refresh_batch(bank_account_ids: list[str], slot: str) -> None:
    """The fan-out's job: scheduler reads of the accounts due in one second of the slot."""
    message = CurrentMessage.get_current_message()
    outbox_id = message.options.get("outbox_id") if message is not None else None
    run_coroutine(refresh_many(bank_account_ids, parse_slot(slot), outbox_id=outbox_id))
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
        return clock().replace(microsecond=0)
    try:
        parsed = datetime.fromisoformat(slot)
    except (TypeError, ValueError):
        raise PermanentError("slot is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise PermanentError("slot needs a UTC offset")
    return parsed


def fan_out(slot: datetime, *, spread_s: int = rules.DEFAULT_SPREAD_S, chunk: int = FANOUT_CHUNK,
            batch_size: int = BATCH_SIZE) -> int:
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
            row = one_row(conn.execute(_FANOUT, {"slot_ts": slot, "slot": slot_text, "after": after, "chunk": chunk,
                                                 "spread": max(spread_s, 1), "job": REFRESH_BATCH,
                                                 "batch_size": max(1, min(batch_size, MAX_BATCH_SIZE))}).fetchone())
        total += row["inserted"]
        if row["scanned"] < chunk:
            break
        after = row["last_id"]
    FANOUT_JOBS.inc(total)
    log.info("aisp fan-out for slot %s: %d refreshes over %d s", slot_text, total, spread_s)
    return total


@registry.job("aisp.refresh_all", queue=QUEUE, time_limit=600_000)
def refresh_all(slot: str | None = None, spread_s: int | None = None) -> None:
    try:
        spread = rules.clamp_spread(spread_s)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    fan_out(parse_slot(slot), spread_s=spread)
