"""The one writer of `audit_log` (DESIGN.md: ids, statuses, codes and counts; never personal data).

Callers pass their own connection, so an audit row commits with the change it records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from db.pool import Conn

# The statement, for callers on an async connection (jobs/aisp.py) that cannot take a sync Conn.
INSERT = "INSERT INTO audit_log (user_id, action, details) VALUES (%s, %s, %s)"


_INSERT_MANY = """INSERT INTO audit_log (user_id, action, details)
    SELECT u, a, d FROM unnest(%s::text[], %s::text[], %s::jsonb[]) WITH ORDINALITY AS v(u, a, d, n) ORDER BY n"""


def record(conn: Conn, action: str, details: dict[str, Any], *, user_id: str | None = None) -> None:
    conn.execute(INSERT, (user_id, action, Jsonb(details)))


def record_many(conn: Conn, rows: list[tuple[str | None, str, dict[str, Any]]]) -> None:
    """Several rows (user_id, action, details) in one statement, in order (a KYC chunk's)."""
    if rows:
        conn.execute(_INSERT_MANY, ([r[0] for r in rows], [r[1] for r in rows], [Jsonb(r[2]) for r in rows]))


@dataclass(frozen=True)
class Audit:
    """An audit row an operation writes in its own transaction, once it knows the ids it touched
    (worker.dlq adds them to `details`)."""

    action: str
    details: dict[str, Any] = field(default_factory=dict)
