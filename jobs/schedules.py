"""All periodic work, in one readable place: what fires when (Europe/Oslo wall-clock) and why.

The scheduler process (scheduler.py) fires these; `drop-jobs status` and the console show each
one's next fire time from the same triggers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

OSLO = ZoneInfo("Europe/Oslo")


@dataclass(frozen=True)
class Schedule:
    job: str
    trigger: CronTrigger
    grace: timedelta
    why: str


SCHEDULES: tuple[Schedule, ...] = (
    Schedule(
        "aisp.refresh_all",
        CronTrigger(hour="0,6,12,18", minute=15, timezone=OSLO),
        timedelta(hours=1),
        "unattended balance refresh, 4 slots a day ~6 h apart (PSD2: at most 4 reads/24 h)",
    ),
    Schedule(
        "sca.expire_timeouts",
        CronTrigger(minute="*", timezone=OSLO),
        timedelta(seconds=55),
        "fail payments past their SCA deadline; the next minute covers a missed one",
    ),
    Schedule(
        "pisp.sweep",
        CronTrigger(minute="*", timezone=OSLO),
        timedelta(seconds=55),
        "re-derive due payment polls from PostgreSQL (survives lost messages)",
    ),
    Schedule(
        "housekeeping.prune",
        CronTrigger(hour=3, minute=30, timezone=OSLO),
        timedelta(hours=6),
        "prune processed_events past the dedup window, done outbox rows, handled dead letters",
    ),
)


def next_fire(schedule: Schedule, after: datetime) -> datetime | None:
    """The first slot of `schedule` strictly after `after` (aware datetime), in Oslo time."""
    return schedule.trigger.get_next_fire_time(None, after + timedelta(microseconds=1))
