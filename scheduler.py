"""The scheduler: APScheduler cron triggers in Europe/Oslo, one leader, every slot fired once.

Any number of replicas may run. The leader holds a PostgreSQL advisory lock on a dedicated
connection (PostgreSQL's server-side TCP keepalives, db.pool, end a vanished leader's session
and its lock within ~11 s); standbys try to take it every LEASE_CHECK_INTERVAL_S. A fire is
exact whatever happens to leadership: it inserts
`scheduler_fires (job, slot)` (primary key) and the outbox row with idempotency key
`drop:schedule:<job>:<slot>` in one transaction, so a slot is enqueued once even if two processes
believe they lead (APScheduler cannot share a job store between processes, so exactness lives
in PostgreSQL, not in APScheduler).

Misfires: on taking leadership, and on every tick, the latest slot of each schedule that was
not fired is fired once if it is still within the schedule's grace time (coalesced); older
missed slots are recorded as `missed`, never replayed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import psycopg
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Gauge,
    start_http_server,
)
from psycopg.rows import dict_row

import jobs
from db.pool import Conn, connection_options, database_url, one_row, transaction
from jobs.schedules import OSLO, SCHEDULES, Schedule
from worker import alerts
from worker.process import start_process
from worker.redis_client import get_redis, key

log = logging.getLogger("scheduler")

LEASE_CHECK_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 30
MAX_MISSED_RECORDED = 100  # per schedule and catch-up pass: a long outage is summarised, not listed


# The scheduler's metrics port serves only its own families: importing `jobs` registers the job
# modules' metrics on prometheus_client's default registry, and those belong to the workers.
REGISTRY = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)
FIRE_AGE = Gauge("drop_scheduler_last_fire_timestamp_seconds", "Unix time of the last slot fired, per job", ["job"],
                 registry=REGISTRY)
IS_LEADER = Gauge("drop_scheduler_is_leader", "1 if this scheduler replica is the leader", registry=REGISTRY)
HEARTBEAT = Gauge("drop_scheduler_heartbeat_timestamp_seconds", "Unix time of this replica's last loop",
                  registry=REGISTRY)


# --- pure slot arithmetic ------------------------------------------------------------------


def latest_slot(trigger: CronTrigger, now: datetime, *, lookback: timedelta) -> datetime | None:
    """The latest fire time of `trigger` in (now - lookback, now], or None."""
    start = now - lookback
    slot = trigger.get_next_fire_time(None, start)
    latest = None
    while slot is not None and slot <= now:
        latest = slot
        slot = trigger.get_next_fire_time(slot, slot + timedelta(microseconds=1))
    return latest


def slots_between(trigger: CronTrigger, after: datetime, until: datetime, *, limit: int) -> list[datetime]:
    """Fire times in (after, until], at most the `limit` most recent."""
    found: list[datetime] = []
    slot = trigger.get_next_fire_time(None, after + timedelta(microseconds=1))
    while slot is not None and slot <= until:
        found.append(slot)
        if len(found) > limit:
            found.pop(0)
        slot = trigger.get_next_fire_time(slot, slot + timedelta(microseconds=1))
    return found


def slot_key(job: str, slot: datetime) -> str:
    """The slot's outbox key, under the reserved prefix: no caller can take it (docs/enqueue.md)."""
    return f"drop:schedule:{job}:{slot.astimezone(OSLO).isoformat()}"


# --- the effects (PostgreSQL) ---------------------------------------------------------------


def fire(schedule: Schedule, slot: datetime, leader: str) -> bool:
    """Enqueue `schedule.job` for `slot` exactly once; False if the slot was already taken."""

    with transaction() as conn:
        # The job first, then the fire that names it: a recorded fire always enqueued something
        # (a CHECK on scheduler_fires). A replica racing for the same slot waits on the outbox
        # key, gets the same row back, and then loses the (job, slot) insert.
        outbox_id, _ = jobs.enqueue_internal(
            schedule.job,
            {"slot": slot.astimezone(OSLO).isoformat()},
            key=slot_key(schedule.job, slot),
            conn=conn,
        )
        taken = conn.execute(
            """INSERT INTO scheduler_fires (job, slot, status, leader, outbox_id) VALUES (%s, %s, 'fired', %s, %s)
               ON CONFLICT (job, slot) DO NOTHING RETURNING job""",
            (schedule.job, slot, leader, outbox_id),
        ).fetchone()
        if taken is None:
            return False
    FIRE_AGE.labels(schedule.job).set(slot.timestamp())
    log.info("fired %s for slot %s", schedule.job, slot.isoformat())
    return True


def catch_up(schedule: Schedule, now: datetime, leader: str) -> dict[str, int]:
    """Fire the latest due slot if within grace; record older unfired slots as missed."""

    with transaction() as conn:
        row = one_row(conn.execute("SELECT max(slot) AS last FROM scheduler_fires WHERE job = %s",
                                   (schedule.job,)).fetchone())
    last = row["last"]
    fired = missed = 0
    due = latest_slot(schedule.trigger, now, lookback=schedule.grace)
    if last is not None:
        horizon = due if due is not None else now + timedelta(microseconds=1)
        gaps = [s for s in slots_between(schedule.trigger, last, now, limit=MAX_MISSED_RECORDED) if s < horizon]
        if gaps:
            with transaction() as conn:
                for s in gaps:
                    missed += conn.execute(
                        """INSERT INTO scheduler_fires (job, slot, status, leader) VALUES (%s, %s, 'missed', %s)
                           ON CONFLICT (job, slot) DO NOTHING""",
                        (schedule.job, s, leader),
                    ).rowcount
            if missed:
                log.warning("%s: %d slot(s) missed during an outage were recorded, not replayed", schedule.job, missed)
    if due is not None and fire(schedule, due, leader):
        fired = 1
    return {"fired": fired, "missed": missed}


# --- leadership -----------------------------------------------------------------------------


class Leadership:
    """A PostgreSQL advisory-lock lease on a dedicated connection."""

    def __init__(self, conninfo: str, identity: str) -> None:
        self.conninfo = conninfo
        self.identity = identity
        self.conn: Conn | None = None
        self.since: float | None = None

    @property
    def is_leader(self) -> bool:
        return self.conn is not None

    def _lock_sql(self, fn: str) -> str:
        return f"SELECT {fn}(hashtext('drop-worker:scheduler:' || current_schema())) AS ok"

    def check(self) -> bool:
        """Keep or try to take the lease; return whether we lead now."""
        if self.conn is not None:
            try:
                self.conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.warning("lost the scheduler lease (database connection broken)")
                self._drop()
                return False
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, row_factory=dict_row,
                                   **connection_options(self.conninfo))
        except psycopg.Error as error:
            log.warning("cannot reach PostgreSQL for the scheduler lease: %s", type(error).__name__)
            return False
        got = one_row(conn.execute(self._lock_sql("pg_try_advisory_lock")).fetchone())["ok"]
        if got:
            self.conn, self.since = conn, time.time()
            log.info("this replica (%s) is now the scheduler leader", self.identity)
            return True
        conn.close()
        return False

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn, self.since = None, None

    def release(self) -> None:
        if self.conn is not None:
            try:
                self.conn.execute(self._lock_sql("pg_advisory_unlock"))
            except psycopg.Error:
                pass
        self._drop()


def publish_heartbeat(leadership: Leadership) -> None:
    now = time.time()
    HEARTBEAT.set(now)
    IS_LEADER.set(1 if leadership.is_leader else 0)
    if leadership.is_leader:
        value = {"leader": leadership.identity, "since": leadership.since, "heartbeat": now}
        get_redis().set(key("scheduler", "leader"), json.dumps(value), ex=HEARTBEAT_TTL_S)


# --- the process ----------------------------------------------------------------------------


class SchedulerService:
    def __init__(
        self,
        identity: str | None = None,
        schedules: tuple[Schedule, ...] = SCHEDULES,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.clock = clock or (lambda: datetime.now(OSLO))
        known = set(jobs.known_jobs())
        self.schedules = tuple(s for s in schedules if s.job in known)
        for s in schedules:
            if s.job not in known:
                log.warning("schedule for %s skipped: no such job is registered yet", s.job)
        self.leadership = Leadership(database_url(), self.identity)
        self.stop_event = threading.Event()
        self.aps = BackgroundScheduler(timezone=OSLO)
        for s in self.schedules:
            self.aps.add_job(
                self._tick,
                s.trigger,
                args=[s],
                id=s.job,
                name=s.why,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=int(s.grace.total_seconds()),
            )

    def _tick(self, schedule: Schedule) -> None:
        if not self.leadership.is_leader:
            return
        try:
            catch_up(schedule, self.clock(), self.identity)
        except Exception:
            # Not fatal: the next tick (or the next leader) catches up from PostgreSQL.
            log.exception("firing %s failed", schedule.job)

    def step(self) -> None:
        was_leader = self.leadership.is_leader
        leads = self.leadership.check()
        if leads and not was_leader:
            for s in self.schedules:
                self._tick(s)
        publish_heartbeat(self.leadership)

    def run(self) -> None:
        self.aps.start()
        try:
            while not self.stop_event.is_set():
                try:
                    self.step()
                except Exception:
                    log.exception("scheduler loop error")
                self.stop_event.wait(LEASE_CHECK_INTERVAL_S)
        finally:
            self.aps.shutdown(wait=False)
            self.leadership.release()
            log.info("scheduler %s stopped", self.identity)


def main() -> int:
    run = start_process("scheduler")
    service = SchedulerService()
    service.stop_event = run.stop
    if run.settings.scheduler_metrics_port:
        start_http_server(run.settings.scheduler_metrics_port, addr=run.settings.monitor_host, registry=REGISTRY)
    log.info("scheduler %s started with %d schedule(s)", service.identity, len(service.schedules))
    alerts.process_started("scheduler", f"Scheduler replica started with {len(service.schedules)} schedule(s).")
    service.run()
    alerts.process_stopping("scheduler", f"{run.reason} received; replica stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
