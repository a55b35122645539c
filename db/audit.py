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


def record(conn: Conn, action: str, details: dict[str, Any], *, user_id: str | None = None) -> None:
    conn.execute(INSERT, (user_id, action, Jsonb(details)))


@dataclass(frozen=True)
class Audit:
    """An audit row an operation writes in its own transaction, once it knows the ids it touched
    (worker.dlq adds them to `details`)."""

    action: str
    details: dict[str, Any] = field(default_factory=dict)
