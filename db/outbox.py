"""The SQL of the outbox and dead-letter contract: every statement on `job_outbox` and
`dead_letters` is here (docs/enqueue.md, docs/architecture.md).

Functions take the caller's connection, so a job's effects, its "done" mark and its follow-up
jobs commit in one transaction. Statements that a job family combines with its own SQL in one
round trip (AISP) use the fragments at the end; their text lives here all the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb

from db.pool import Conn, one_row

# Makes one statement an internal producer's: migration 0006 lets only such statements write
# keys under the reserved prefix.
INTERNAL_PRODUCER_CTE = "producer AS (SELECT job_outbox_as_internal_producer())"
INSERT_COLUMNS = "INSERT INTO job_outbox (job, payload, idempotency_key, available_at)"
# A job's row done, with the job's effects (as a statement, or a CTE of a larger one).
MARK_DONE_BY_NAME = "UPDATE job_outbox SET done_at = now() WHERE id = %(outbox_id)s AND done_at IS NULL"

_INSERT = f"""{INSERT_COLUMNS}
    VALUES (%s, %s, %s, COALESCE(%s, now()))
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id"""
_INSERT_INTERNAL = f"""WITH {INTERNAL_PRODUCER_CTE}
    {INSERT_COLUMNS}
    SELECT %s, %s, %s, COALESCE(%s, now()) FROM producer
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id"""


def _id(row: Any) -> int | None:
    if row is None:
        return None
    return int(row["id"] if isinstance(row, dict) else row[0])


# --- enqueue ---------------------------------------------------------------------------------


def insert(conn: Conn, job: str, payload: dict[str, Any], key: str,
           available_at: datetime | None) -> int | None:
    """A caller's job; None when the key was already used."""
    return _id(conn.execute(_INSERT, (job, Jsonb(payload), key, available_at)).fetchone())


def insert_internal(conn: Conn, job: str, payload: dict[str, Any], key: str,
                    available_at: datetime | None) -> int | None:
    """An internal producer's job (reserved key); None when the key was already used."""
    return _id(conn.execute(_INSERT_INTERNAL, (job, Jsonb(payload), key, available_at)).fetchone())


def holder_of_key(conn: Conn, key: str, available_at: datetime | None) -> dict[str, Any] | None:
    """The row holding `key`: id, job, payload and whether it is due no later than asked."""
    row = conn.execute(
        """SELECT id, job, payload, available_at <= COALESCE(%s, now()) + interval '1 minute' AS due_in_time
             FROM job_outbox WHERE idempotency_key = %s""",
        (available_at, key),
    ).fetchone()
    if row is None:
        return None
    return row if isinstance(row, dict) else dict(zip(("id", "job", "payload", "due_in_time"), row, strict=True))


def mark_done(conn: Conn, outbox_id: int) -> None:
    conn.execute(MARK_DONE_BY_NAME, {"outbox_id": outbox_id})


def mark_done_many(conn: Conn, outbox_ids: Sequence[int]) -> None:
    """Many jobs' rows done in one statement (a chunk's, with the chunk's effects)."""
    if outbox_ids:
        conn.execute("UPDATE job_outbox SET done_at = now() WHERE id = ANY(%s) AND done_at IS NULL",
                     (list(outbox_ids),))


def pending_rows(conn: Conn, outbox_ids: Sequence[int], job: str, *, lock: bool = True) -> list[dict[str, Any]]:
    """The rows of `job` among `outbox_ids` still to do (not done, not closed), in id order; locked
    for the caller's transaction (in id order: two chunks never deadlock on them). A row another
    transaction is finishing is waited for, then left out once it is done."""
    rows = conn.execute(
        f"""SELECT id, payload, idempotency_key FROM job_outbox
             WHERE id = ANY(%s) AND job = %s AND done_at IS NULL AND error IS NULL
             ORDER BY id{" FOR UPDATE" if lock else ""}""",
        (list(outbox_ids), job),
    ).fetchall()
    return [r if isinstance(r, dict) else dict(zip(("id", "payload", "idempotency_key"), r, strict=True))
            for r in rows]


# --- relay -----------------------------------------------------------------------------------


def due_sizes(conn: Conn, redeliver_after: timedelta, limit: int) -> list[dict[str, Any]]:
    """Due rows (id, payload bytes), locked for this relay pass; sizes first so a batch's
    payloads never exceed the relay's byte budget in memory."""
    return conn.execute(
        """SELECT id, octet_length(payload::text) AS size
             FROM job_outbox
            WHERE done_at IS NULL AND error IS NULL AND available_at <= now()
              AND (relayed_at IS NULL OR relayed_at < now() - %s)
            ORDER BY id
            LIMIT %s
            FOR UPDATE SKIP LOCKED""",
        (redeliver_after, limit),
    ).fetchall()


def rows_to_relay(conn: Conn, ids: Sequence[int]) -> list[dict[str, Any]]:
    """The rows as text: decoding is the relay's, row by row (a hostile payload is one row's problem)."""
    if not ids:
        return []
    return conn.execute(
        """SELECT id, job, payload::text AS payload_text, idempotency_key
             FROM job_outbox WHERE id = ANY(%s) ORDER BY id""",
        (list(ids),),
    ).fetchall()


def mark_relayed(conn: Conn, ids: Sequence[int]) -> None:
    if ids:
        conn.execute("UPDATE job_outbox SET relayed_at = now(), relay_count = relay_count + 1 WHERE id = ANY(%s)",
                     (list(ids),))


def close_rejected(conn: Conn, rejected: Sequence[tuple[str, int]]) -> None:
    """Rows that cannot become a job: closed with their reason, never relayed again."""
    if rejected:
        conn.cursor().executemany("UPDATE job_outbox SET error = %s WHERE id = %s", list(rejected))


def reopen_relayed(conn: Conn) -> int:
    """After the broker lost its data: every relayed-but-not-done row is sent again."""
    return conn.execute(
        """UPDATE job_outbox SET relayed_at = NULL
            WHERE relayed_at IS NOT NULL AND done_at IS NULL AND error IS NULL"""
    ).rowcount


# --- dead letters ----------------------------------------------------------------------------


def record_dead_letter(conn: Conn, *, message_id: str, job: str, queue: str, message: dict[str, Any],
                       outbox_id: int | None, reason: str, retries: int) -> None:
    """The dead letter, and its outbox row closed with the reason (the relay never sends it again)."""
    conn.execute(
        """INSERT INTO dead_letters (message_id, job, queue_name, message, outbox_id, reason, retries)
           VALUES (%s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (message_id) DO UPDATE
           SET reason = EXCLUDED.reason, retries = EXCLUDED.retries,
               failed_at = now(), replayed_at = NULL""",
        (message_id, job, queue, Jsonb(message), outbox_id, reason, retries),
    )
    if outbox_id is not None:
        conn.execute("UPDATE job_outbox SET error = %s WHERE id = %s AND done_at IS NULL",
                     (f"{DEAD_LETTERED}{reason}", outbox_id))


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _open_filter(ids: Sequence[int] | None, job: str | None,
                 reason: str | None = None) -> tuple[str, list[Any]]:
    """Open dead letters: these ids (None: any), of this job, whose reason contains `reason`."""
    clauses: list[str] = ["replayed_at IS NULL"]
    params: list[Any] = []
    if ids is not None:
        clauses.append("id = ANY(%s)")
        params.append(list(ids))
    if job:
        clauses.append("job = %s")
        params.append(job)
    if reason:
        clauses.append("reason ILIKE %s")
        params.append(f"%{_like_prefix(reason)}%")
    return " AND ".join(clauses), params


def list_dead_letters(conn: Conn, *, limit: int, job: str | None, reason: str | None = None,
                      after: tuple[datetime, int] | None = None) -> list[dict[str, Any]]:
    """Open dead letters, newest failure first; `after` (failed_at, id) of the last row seen
    pages on (keyset: as fast on the last page as on the first)."""
    where, params = _open_filter(None, job, reason)
    if after is not None:
        where += " AND (failed_at, id) < (%s, %s)"
        params += list(after)
    return conn.execute(
        f"SELECT id, job, queue_name, reason, retries, failed_at, first_failed_at, outbox_id FROM dead_letters "
        f"WHERE {where} ORDER BY failed_at DESC, id DESC LIMIT %s",
        [*params, limit],
    ).fetchall()


def count_open_dead_letters(conn: Conn, *, job: str | None, reason: str | None = None) -> int:
    where, params = _open_filter(None, job, reason)
    return int(one_row(conn.execute(f"SELECT count(*) AS n FROM dead_letters WHERE {where}", params).fetchone())["n"])


def get_dead_letter(conn: Conn, dead_letter_id: int) -> dict[str, Any] | None:
    return conn.execute("SELECT * FROM dead_letters WHERE id = %s", (dead_letter_id,)).fetchone()


def lock_open_dead_letters(conn: Conn, ids: Sequence[int] | None,
                           job: str | None, reason: str | None = None) -> list[dict[str, Any]]:
    where, params = _open_filter(ids, job, reason)
    return conn.execute(f"SELECT * FROM dead_letters WHERE {where} ORDER BY id FOR UPDATE SKIP LOCKED",
                        params).fetchall()


def reopen(conn: Conn, outbox_id: int) -> bool:
    """Send an outbox row again (a replayed dead letter): the relay picks it up now."""
    return bool(conn.execute(
        """UPDATE job_outbox SET error = NULL, relayed_at = NULL, available_at = now()
            WHERE id = %s AND done_at IS NULL""",
        (outbox_id,),
    ).rowcount)


def mark_replayed(conn: Conn, dead_letter_id: int) -> None:
    conn.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = %s", (dead_letter_id,))


DEAD_LETTERED = "dead-lettered: "  # job_outbox.error of a row whose job became a dead letter
PURGED = "purged: "  # … and once on-call purged that dead letter (the row keeps its outcome)


def delete_open_dead_letters(conn: Conn, ids: Sequence[int] | None,
                             job: str | None, reason: str | None = None) -> list[dict[str, Any]]:
    """Purge: the dead letters go, their outbox rows say so (no view still shows the failure)."""
    where, params = _open_filter(ids, job, reason)
    rows = conn.execute(f"DELETE FROM dead_letters WHERE {where} RETURNING id, queue_name, message, outbox_id",
                        params).fetchall()
    outbox_ids = [r["outbox_id"] for r in rows if r["outbox_id"] is not None]
    if outbox_ids:
        conn.execute(
            "UPDATE job_outbox SET error = %s || error WHERE id = ANY(%s) AND error LIKE %s",
            (PURGED, outbox_ids, DEAD_LETTERED + "%"),
        )
    return rows


# --- housekeeping and the monitor's view ----------------------------------------------------


def prune(conn: Conn, *, done_for: timedelta, failed_for: timedelta, replayed_for: timedelta,
          open_for: timedelta) -> dict[str, int]:
    """Delete outbox rows and dead letters that have outlived their purpose; counts per kind."""
    statements = {
        "job_outbox": ("DELETE FROM job_outbox WHERE done_at < now() - %s", done_for),
        "job_outbox_failed": (
            "DELETE FROM job_outbox WHERE done_at IS NULL AND error IS NOT NULL AND created_at < now() - %s",
            failed_for,
        ),
        "dead_letters": ("DELETE FROM dead_letters WHERE replayed_at < now() - %s", replayed_for),
        "dead_letters_open": (
            "DELETE FROM dead_letters WHERE replayed_at IS NULL AND failed_at < now() - %s",
            open_for,
        ),
    }
    return {name: conn.execute(sql, (age,)).rowcount for name, (sql, age) in statements.items()}


def open_dead_letters_by_job(conn: Conn) -> list[dict[str, Any]]:
    """Open dead letters per job: job, n, newest (id), newest_at, biggest count first."""
    return conn.execute(
        """SELECT job, count(*) AS n, max(id) AS newest, max(failed_at) AS newest_at FROM dead_letters
            WHERE replayed_at IS NULL GROUP BY job ORDER BY n DESC, job"""
    ).fetchall()


def backlog(conn: Conn) -> dict[str, Any]:
    """Outbox rows due and not done: backlog (count), oldest (age in seconds, 0 when none)."""
    return one_row(conn.execute(
        """SELECT count(*) AS backlog,
                  COALESCE(extract(epoch FROM now() - min(available_at)), 0)::float8 AS oldest
             FROM job_outbox
            WHERE done_at IS NULL AND error IS NULL AND available_at <= now()"""
    ).fetchone())


def status(conn: Conn) -> dict[str, Any]:
    """`drop-jobs status`: pending, unrelayed, failed (every closed row), rejected (closed by the
    relay and never run: not a dead letter, so shown on their own), oldest_pending_s."""
    return one_row(conn.execute(
        """SELECT count(*) FILTER (WHERE done_at IS NULL AND error IS NULL) AS pending,
                  count(*) FILTER (WHERE done_at IS NULL AND error IS NULL AND relayed_at IS NULL
                                   AND available_at <= now()) AS unrelayed,
                  count(*) FILTER (WHERE error IS NOT NULL AND done_at IS NULL) AS failed,
                  count(*) FILTER (WHERE error IS NOT NULL AND done_at IS NULL
                                   AND error NOT LIKE 'dead-lettered: %%' AND error NOT LIKE 'purged: %%')
                      AS rejected,
                  extract(epoch FROM now() - min(available_at)
                          FILTER (WHERE done_at IS NULL AND error IS NULL AND available_at <= now()))
                      AS oldest_pending_s
             FROM job_outbox"""
    ).fetchone())


# --- the console's search (monitoring/console) ---------------------------------------------

# A row's state, as the console names it: waiting for the relay, sent to the broker, done, or
# closed with an error (dead-lettered, purged, or rejected by the relay).
STATES: dict[str, str] = {
    "pending": "done_at IS NULL AND error IS NULL AND relayed_at IS NULL",
    "relayed": "done_at IS NULL AND error IS NULL AND relayed_at IS NOT NULL",
    "done": "done_at IS NOT NULL",
    "error": "done_at IS NULL AND error IS NOT NULL",
}
_STATE_OF_ROW = ("CASE WHEN done_at IS NOT NULL THEN 'done' WHEN error IS NOT NULL THEN 'error' "
                 "WHEN relayed_at IS NOT NULL THEN 'relayed' ELSE 'pending' END AS state")
# Payload keys only, computed in PostgreSQL: payload values never leave the database.
_PAYLOAD_KEYS = ("CASE WHEN jsonb_typeof(payload) = 'object' THEN ARRAY(SELECT jsonb_object_keys(payload) ORDER BY 1)"
                 " ELSE '{}'::text[] END AS payload_keys")
_JOB_COLUMNS = ("id, job, idempotency_key, created_at, available_at, relayed_at, relay_count, done_at, error, "
                + _STATE_OF_ROW)


def search(conn: Conn, *, job: str | None = None, state: str | None = None, key_prefix: str | None = None,
           created_from: datetime | None = None, created_to: datetime | None = None,
           before_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Outbox rows matching every filter given, newest first; `before_id` (the last id seen)
    pages on by keyset, so the hundredth page costs what the first does."""
    clauses: list[str] = []
    params: list[Any] = []
    if job:
        clauses.append("job = %s")
        params.append(job)
    if state:
        clauses.append(STATES[state])
    if key_prefix:
        clauses.append("idempotency_key LIKE %s")
        params.append(_like_prefix(key_prefix) + "%")
    if created_from is not None:
        clauses.append("created_at >= %s")
        params.append(created_from)
    if created_to is not None:
        clauses.append("created_at < %s")
        params.append(created_to)
    if before_id is not None:
        clauses.append("id < %s")
        params.append(before_id)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return conn.execute(f"SELECT {_JOB_COLUMNS} FROM job_outbox {where} ORDER BY id DESC LIMIT %s",
                        [*params, limit]).fetchall()


def get_row(conn: Conn, outbox_id: int) -> dict[str, Any] | None:
    """One outbox row's lifecycle and payload keys (never its payload)."""
    return conn.execute(f"SELECT {_JOB_COLUMNS}, {_PAYLOAD_KEYS} FROM job_outbox WHERE id = %s",
                        (outbox_id,)).fetchone()


def job_names(conn: Conn) -> list[str]:
    """Job names present in the outbox (a loose index scan on job_outbox_job_idx: one probe per name)."""
    return [r["job"] for r in conn.execute(
        """WITH RECURSIVE names AS (
               (SELECT job FROM job_outbox ORDER BY job LIMIT 1)
               UNION ALL
               SELECT (SELECT job FROM job_outbox WHERE job > names.job ORDER BY job LIMIT 1) FROM names
                WHERE names.job IS NOT NULL)
           SELECT job FROM names WHERE job IS NOT NULL"""
    ).fetchall()]


def outcomes_per_minute(conn: Conn, minutes: int = 60) -> list[dict[str, Any]]:
    """Per minute of the last `minutes`: outbox rows done, and jobs dead-lettered (failed for good)."""
    return conn.execute(
        """WITH m AS (SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => %(n)s - 1),
                                             date_trunc('minute', now()), interval '1 minute') AS minute),
                d AS (SELECT date_trunc('minute', done_at) AS minute, count(*) AS n FROM job_outbox
                       WHERE done_at >= date_trunc('minute', now()) - make_interval(mins => %(n)s - 1) GROUP BY 1),
                f AS (SELECT date_trunc('minute', failed_at) AS minute, count(*) AS n FROM dead_letters
                       WHERE failed_at >= date_trunc('minute', now()) - make_interval(mins => %(n)s - 1) GROUP BY 1)
           SELECT m.minute, COALESCE(d.n, 0) AS done, COALESCE(f.n, 0) AS failed
             FROM m LEFT JOIN d USING (minute) LEFT JOIN f USING (minute) ORDER BY m.minute""",
        {"n": minutes},
    ).fetchall()


def states(conn: Conn, ids: Sequence[int]) -> dict[int, str]:
    """Each given outbox row's state (see STATES); a pruned row is absent."""
    if not ids:
        return {}
    rows = conn.execute(f"SELECT id, {_STATE_OF_ROW} FROM job_outbox WHERE id = ANY(%s)", (list(ids),)).fetchall()
    return {int(r["id"]): r["state"] for r in rows}
