"""`drop-jobs status`: the job system at a glance, as data and as a screen.

The first line is the verdict ("healthy", or what needs attention and why); then workers,
queues (in flight included), the outbox, failures (each failure once: a dead letter is shown as
a dead letter, not again as a failed outbox row or a message in Redis's dead set), breakers and
every schedule with its next fire time. Times are Oslo's (the schedules' zone).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

import jobs
from db import outbox
from db.pool import transaction
from jobs.schedules import OSLO, SCHEDULES, next_fire
from worker.probes import breaker_states, queue_stats, queues, scheduler_leader, workers_alive
from worker.relay import relays_alive

# An outbox row due this long and not yet done means the pipeline is behind (the monitor's
# "Outbox stuck" alert waits 5 minutes; a glance can say it earlier).
OUTBOX_BEHIND_S = 60


def collect_status(now: datetime | None = None, *, redis_reachable: bool = True) -> dict[str, Any]:
    """Everything `status` shows, as data (`status --json`, tests). With Redis unreachable, the
    PostgreSQL side (outbox, dead letters, schedules) is still shown; the rest is None."""

    now = now or datetime.now(UTC)
    status: dict[str, Any] = {"redis_reachable": redis_reachable, "queues": None, "breakers": None,
                              "scheduler_leader": None, "workers": None}
    if redis_reachable:
        status.update(queues=queue_stats(queues(jobs.registry.queues())), breakers=breaker_states())
    with transaction() as conn:
        status["dead_letters"] = [
            {"job": r["job"], "count": r["n"], "newest": r["newest_at"]}
            for r in sorted(outbox.open_dead_letters_by_job(conn), key=lambda r: r["job"])
        ]
        status["outbox"] = outbox.status(conn)
        fires = {r["job"]: r for r in conn.execute(
            """SELECT DISTINCT ON (job) job, slot, status, leader,
                      extract(epoch FROM now() - fired_at) AS age_s
                 FROM scheduler_fires ORDER BY job, fired_at DESC"""
        ).fetchall()}
    status["schedules"] = [
        {
            "job": s.job,
            "next_fire": next_fire(s, now),
            "last_slot": fires[s.job]["slot"] if s.job in fires else None,
            "last_status": fires[s.job]["status"] if s.job in fires else None,
            "last_age_s": float(fires[s.job]["age_s"]) if s.job in fires else None,
            "why": s.why,
        }
        for s in SCHEDULES
    ]
    if redis_reachable:
        status["scheduler_leader"] = scheduler_leader()
        status["workers"] = {"consumers": workers_alive(), "relays": relays_alive()}
    status["attention"] = attention(status)
    return status


def attention(status: dict[str, Any]) -> list[str]:
    """What on-call should look at, most urgent first; empty when healthy."""

    problems = []
    if not status["redis_reachable"]:
        problems.append("Redis unreachable: queues, workers, breakers and the scheduler leader are unknown")
    elif not status["workers"]["consumers"]:
        problems.append("no worker alive: nothing is processed")
    if status["workers"] and not status["workers"]["relays"]:
        problems.append("no outbox relay alive: nothing new reaches the queues")
    if status["redis_reachable"] and not status["scheduler_leader"]:
        problems.append("no scheduler leader: periodic jobs do not fire")
    opened = sorted(name for name, state in (status["breakers"] or {}).items() if state != "closed")
    if opened:
        problems.append(f"breaker {', '.join(opened)} not closed: provider calls are refused")
    waiting = sum(r["count"] for r in status["dead_letters"])
    if waiting:
        problems.append(f"{waiting} dead letter(s) waiting: `drop-jobs dlq list`")
    oldest = status["outbox"]["oldest_pending_s"]
    if oldest is not None and float(oldest) > OUTBOX_BEHIND_S:
        problems.append(f"outbox behind: oldest pending row is {fmt_age(float(oldest))} old")
    if status["outbox"]["rejected"]:
        problems.append(f"{status['outbox']['rejected']} outbox row(s) rejected by the relay (never ran)")
    return problems


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def oslo(when: datetime | None) -> str:
    """A time on screen: Oslo's, to the second, without the offset noise."""
    return when.astimezone(OSLO).strftime("%Y-%m-%d %H:%M:%S") if when else "-"


def console(file: Any = None) -> Console:
    """Colour on a terminal (NO_COLOR respected by rich), plain text when piped; piped output
    is not squeezed to 80 columns."""
    out = Console(file=file, highlight=False, soft_wrap=False)
    if not out.is_terminal:
        out = Console(file=file, highlight=False, width=160, no_color=True)
    return out


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    return table


_STATE_STYLE = {"closed": "green", "open": "bold red", "half-open": "yellow"}


def render(status: dict[str, Any], out: Console) -> None:
    problems = status["attention"]
    if problems:
        out.print(Text(f"ATTENTION  {len(problems)} problem(s)", style="bold red"))
        for problem in problems:
            out.print(f"  - {problem}")
    else:
        out.print(Text("HEALTHY", style="bold green") + Text("  workers, relays, scheduler and breakers ok; "
                                                             "no dead letters; outbox keeping up"))
    unknown = "unknown (Redis unreachable)"
    w = status["workers"]
    out.print(f"\nWORKERS  consumers alive {w['consumers']}  outbox relays alive {w['relays']}" if w
              else f"\nWORKERS  {unknown}")

    out.print("\nQUEUES" if status["queues"] is not None else f"\nQUEUES  {unknown}")
    if status["queues"] is not None:
        table = _table("queue", "ready", "delayed", "in flight")
        for q in status["queues"]:
            table.add_row(q["queue"], str(q["ready"]), str(q["delayed"]), str(q["in_flight"]))
        out.print(table)

    o = status["outbox"]
    oldest = float(o["oldest_pending_s"]) if o["oldest_pending_s"] is not None else None
    out.print(f"\nOUTBOX  pending {o['pending']}  not yet relayed {o['unrelayed']}  oldest pending {fmt_age(oldest)}"
              f"  rejected by the relay {o['rejected']}")

    dead = status["dead_letters"]
    out.print(Text(f"\nDEAD LETTERS  {sum(r['count'] for r in dead)} open",
                   style="bold red" if dead else ""))
    if dead:
        table = _table("job", "count", "newest (Oslo)")
        for r in dead:
            table.add_row(r["job"], str(r["count"]), oslo(r["newest"]))
        out.print(table)
        out.print("  `drop-jobs dlq list` to see why; `drop-jobs dlq replay ID` once the cause is fixed")

    out.print("\nBREAKERS" if status["breakers"] is not None else f"\nBREAKERS  {unknown}")
    if status["breakers"]:
        table = _table("breaker", "state")
        for name, state in status["breakers"].items():
            table.add_row(name, Text(state, style=_STATE_STYLE.get(state, "")))
        out.print(table)
    elif status["breakers"] is not None:
        out.print("(none reported yet)")

    leader = status["scheduler_leader"]
    out.print(f"\nSCHEDULER  leader {leader.get('leader', 'none') if leader else 'none'}" if status["redis_reachable"]
              else f"\nSCHEDULER  leader {unknown}")
    table = _table("job", "next fire (Oslo)", "last slot (Oslo)", "outcome", "ago")
    for s in status["schedules"]:
        table.add_row(s["job"], oslo(s["next_fire"]), oslo(s["last_slot"]),
                      Text(s["last_status"] or "never fired", style="" if s["last_status"] else "yellow"),
                      fmt_age(s["last_age_s"]))
    out.print(table)
