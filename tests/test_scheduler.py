"""Scheduler: cron slots in Europe/Oslo, one leader, each slot enqueued once, misfires coalesced."""

import threading
from datetime import datetime, timedelta

import pytest
from apscheduler.triggers.cron import CronTrigger

import scheduler
from jobs.schedules import OSLO, SCHEDULES, Schedule
from scheduler import Leadership, catch_up, fire, latest_slot, slots_between

EVERY_MINUTE = Schedule("housekeeping.prune", CronTrigger(minute="*", timezone=OSLO), timedelta(seconds=55), "t")
FOUR_A_DAY = Schedule(
    "housekeeping.prune", CronTrigger(hour="0,6,12,18", minute=15, timezone=OSLO), timedelta(hours=1), "t"
)


def test_schedules_are_in_oslo_time_and_aisp_has_four_slots_a_day():
    names = {s.job for s in SCHEDULES}
    assert {"aisp.refresh_all", "sca.expire_timeouts", "pisp.sweep", "housekeeping.prune"} <= names
    aisp = next(s for s in SCHEDULES if s.job == "aisp.refresh_all")
    day = datetime(2026, 11, 21, 0, 0, tzinfo=OSLO)
    slots = slots_between(
        aisp.trigger, day - timedelta(microseconds=1), day + timedelta(days=1) - timedelta(seconds=1), limit=100
    )
    assert [s.hour for s in slots] == [0, 6, 12, 18]
    assert all(s.tzinfo is not None and s.utcoffset() == timedelta(hours=1) for s in slots)  # CET in November


def test_slot_arithmetic_across_the_dst_change():
    # 2026-03-29 02:00 Oslo jumps to 03:00: the 00:15 and 06:15 slots are 5 h apart in real time.
    start = datetime(2026, 3, 29, 0, 0, tzinfo=OSLO)
    slots = slots_between(FOUR_A_DAY.trigger, start, start + timedelta(hours=8), limit=10)
    assert [s.hour for s in slots] == [0, 6]
    assert slots[1].timestamp() - slots[0].timestamp() == 5 * 3600


def test_latest_slot_within_grace():
    now = datetime(2026, 11, 21, 6, 40, tzinfo=OSLO)
    assert latest_slot(FOUR_A_DAY.trigger, now, lookback=timedelta(hours=1)) == datetime(
        2026, 11, 21, 6, 15, tzinfo=OSLO
    )
    later = datetime(2026, 11, 21, 7, 30, tzinfo=OSLO)
    assert latest_slot(FOUR_A_DAY.trigger, later, lookback=timedelta(hours=1)) is None


def test_a_slot_is_enqueued_once_however_many_fire_it(db, sql):
    slot = datetime(2026, 11, 21, 6, 15, tzinfo=OSLO)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(fire(FOUR_A_DAY, slot, f"replica-{i}"))) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    rows = sql("SELECT job, idempotency_key, payload FROM job_outbox")
    assert rows == [
        {
            "job": "housekeeping.prune",
            "idempotency_key": "drop:schedule:housekeeping.prune:2026-11-21T06:15:00+01:00",
            "payload": {"slot": "2026-11-21T06:15:00+01:00"},
        }
    ]


def test_short_outage_fires_the_missed_slot_once_on_recovery(db, sql):
    fire(FOUR_A_DAY, datetime(2026, 11, 21, 0, 15, tzinfo=OSLO), "old-leader")
    # Down from 06:00 to 06:50: the 06:15 slot is within its 1 h grace → fired once, late.
    now = datetime(2026, 11, 21, 6, 50, tzinfo=OSLO)
    assert catch_up(FOUR_A_DAY, now, "new-leader") == {"fired": 1, "missed": 0}
    assert catch_up(FOUR_A_DAY, now, "new-leader") == {"fired": 0, "missed": 0}
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 2


def test_long_outage_records_missed_slots_and_does_not_replay_them(db, sql):
    fire(FOUR_A_DAY, datetime(2026, 11, 20, 0, 15, tzinfo=OSLO), "old-leader")
    now = datetime(2026, 11, 21, 13, 0, tzinfo=OSLO)  # back at 13:00 next day: 12:15 still in grace
    assert catch_up(FOUR_A_DAY, now, "new-leader") == {"fired": 1, "missed": 5}
    rows = sql("SELECT slot, status FROM scheduler_fires ORDER BY slot")
    assert [r["status"] for r in rows] == ["fired"] + ["missed"] * 5 + ["fired"]
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 2  # nothing replayed


def test_only_one_replica_leads_and_a_standby_takes_over(db):
    a, b = Leadership(db, "a"), Leadership(db, "b")
    try:
        assert a.check() is True
        assert b.check() is False
        assert a.check() is True  # keeps the lease
        a.conn.close()  # the leader's connection dies (crash, network)
        assert a.check() is False
        assert b.check() is True
    finally:
        a.release()
        b.release()


def test_service_fires_only_as_leader(db, sql, monkeypatch):
    now = datetime(2026, 11, 21, 6, 20, tzinfo=OSLO)
    leader = scheduler.SchedulerService("leader", schedules=(FOUR_A_DAY,), clock=lambda: now)
    standby = scheduler.SchedulerService("standby", schedules=(FOUR_A_DAY,), clock=lambda: now)
    try:
        leader.step()
        standby.step()
        standby._tick(FOUR_A_DAY)
        leader._tick(FOUR_A_DAY)
        rows = sql("SELECT leader, status FROM scheduler_fires")
        assert rows == [{"leader": "leader", "status": "fired"}]
        from worker.probes import scheduler_leader

        assert scheduler_leader()["leader"] == "leader"
    finally:
        leader.leadership.release()
        standby.leadership.release()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.job)
def test_every_schedule_has_a_grace_shorter_than_its_period(schedule):
    first = schedule.trigger.get_next_fire_time(None, datetime(2026, 11, 21, tzinfo=OSLO))
    second = schedule.trigger.get_next_fire_time(first, first + timedelta(microseconds=1))
    assert schedule.grace < second - first  # a coalesced catch-up never overlaps the next slot
