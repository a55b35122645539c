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

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from dramatiq.middleware import CurrentMessage
from prometheus_client import Counter
from psycopg.types.json import Jsonb

from db import audit as audit_log
from db import outbox
from db.outbox import INTERNAL_PRODUCER_CTE
from db.pool import close_async_pool, get_async_pool, one_row, transaction  # noqa: F401  (close_async_pool: for callers)
from jobs import aisp_rules as rules
from jobs.registry import HIGH_VOLUME_TRACES, registry
from worker.context import note_outbox_done
from worker.loop import run_coroutine
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
from worker.retry import PermanentError

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
# Outcomes whose statement already marked the job's outbox row done (refresh()'s apply, record_failure).
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


async def fetch_one(sql: str, params: tuple | dict) -> dict[str, Any] | None:
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
    row = await fetch_one(_RESERVE, (bank_account_id, initiated_by, now, request_id, rules.QUOTA_LIMIT,
                                rules.QUOTA_WINDOW))
    assert row is not None
    if row["refusal"] is not None:
        return await refused(row, bank_account_id, initiated_by, now)

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
            await fetch_one("DELETE FROM aisp_reads WHERE id = %s", (read_id,))
            raise
        failure = exc
    except (rules.CurrencyMismatchError, rules.NoUsableBalanceError) as exc:
        failure = exc
    if failure is not None:
        handled = await record_failure(row, read_id, bank_account_id, initiated_by, now, request_id, failure, outbox_id)
        if isinstance(handled, Exception):
            raise handled from None
        return RefreshResult(handled)

    await fetch_one(_APPLY_OK, {"read_id": read_id, "outbox_id": outbox_id, "ore": balance.amount_ore, "now": now,
                           "id": bank_account_id, "consent_id": row["consent_id"]})
    READS.labels("ok", initiated_by).inc()
    return RefreshResult("ok", read_id, balance.amount_ore)


async def refused(row: dict[str, Any], bank_account_id: str, initiated_by: str, now: datetime) -> RefreshResult:
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
            await fetch_one(
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
    await fetch_one("DELETE FROM aisp_reads WHERE id = %s", (read_id,))
    SKIPPED.labels("circuit_open", initiated_by).inc()
    if initiated_by == "scheduler":
        wait_s = exc.retry_after_s + random.uniform(1.0, CIRCUIT_JITTER_S)  # no herd at half-open
        if now + timedelta(seconds=wait_s) < rules.next_window_start(now):
            return RefreshResult("circuit_open", run_later_ms=int(wait_s * 1000))
    return RefreshResult("circuit_open")


async def record_failure(row: dict[str, Any], read_id: int, bank_account_id: str, initiated_by: str, now: datetime,
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
        audit_log.INSERT,
        (user_id, action, Jsonb({"bank_account_id": bank_account_id, "request_id": request_id,
                                 "initiated_by": initiated_by, **details})),
    )


async def refresh_handled(bank_account_id: str, initiated_by: str = "scheduler", psu_ip_address: str | None = None,
                          *, now: datetime | None = None, outbox_id: int | None = None) -> RefreshResult:
    """`refresh` (kept under this name for callers: handled answers are results in both)."""
    return await refresh(bank_account_id, initiated_by, psu_ip_address, now=now, outbox_id=outbox_id)


# A sync shell around the coroutine, run on Dramatiq's event loop exactly as an `async def` actor
# would be: the shell reads the message's outbox id in the worker thread, where CurrentMessage's
# context variable is set (it is not visible on the loop thread).
@registry.job(REFRESH_ACCOUNT, queue=QUEUE, time_limit=90_000, traces_share=HIGH_VOLUME_TRACES)
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
