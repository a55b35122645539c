"""Internal producers' idempotency keys cannot be taken by callers of the enqueue contract."""

from __future__ import annotations

import json
from datetime import datetime

import psycopg
import pytest

import jobs
from jobs.schedules import OSLO, SCHEDULES
from scheduler import fire, slot_key
from tests.jobs.test_kyc import USER, add_user, deliver, event, secret  # noqa: F401  (fixture)
from tests.monitoring.conftest import receiver, slack  # noqa: F401  (fixtures)

SCA_EVERY_MINUTE = next(s for s in SCHEDULES if s.job == "sca.expire_timeouts")
SLOT = datetime(2026, 12, 2, 3, 1, tzinfo=OSLO)


def caller_insert(db: str, job: str, key: str, *, available_at: str = "now()") -> None:
    """What any caller of the contract can do: a plain INSERT (here with a due time a year ahead)."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"INSERT INTO job_outbox (job, payload, idempotency_key, available_at) "
                     f"VALUES (%s, '{{}}', %s, {available_at})", (job, key))


def test_caller_cannot_take_a_reserved_key(db):
    with pytest.raises(psycopg.errors.CheckViolation, match="reserved for drop-worker's own producers"):
        caller_insert(db, "housekeeping.prune", slot_key("sca.expire_timeouts", SLOT))
    with pytest.raises(psycopg.errors.CheckViolation, match="reserved"), psycopg.connect(db, autocommit=True) as c:
        c.execute("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES ('housekeeping.prune', '{}', 'x')")
        c.execute("UPDATE job_outbox SET idempotency_key = 'drop:kyc.aml_check:ev-1'")
    with pytest.raises(jobs.ReservedKeyError):
        jobs.enqueue("housekeeping.prune", {}, idempotency_key="drop:schedule:x")


def test_pre_inserted_slot_key_does_not_suppress_sca_expiry(db, sql):
    # The key the scheduler used to use, taken a year ahead by another job: the slot still fires.
    old_style = "schedule:sca.expire_timeouts:" + SLOT.isoformat()
    caller_insert(db, "housekeeping.prune", old_style, available_at="now() + interval '1 year'")
    assert fire(SCA_EVERY_MINUTE, SLOT, "leader-1") is True
    [row] = sql("""SELECT o.job, o.payload, o.available_at <= now() AS due, f.status
                     FROM scheduler_fires f JOIN job_outbox o ON o.id = f.outbox_id""")
    assert row == {"job": "sca.expire_timeouts", "payload": {"slot": SLOT.isoformat()}, "due": True, "status": "fired"}


def test_planted_internal_key_alerts_and_the_slot_still_fires(db, sql, slack):  # noqa: F811
    # A row under the internal key planted before the reserved prefix existed (or by a bug).
    with psycopg.connect(db) as conn, conn.transaction():
        conn.execute("SELECT job_outbox_as_internal_producer()")
        conn.execute("""INSERT INTO job_outbox (job, payload, idempotency_key, available_at)
                        VALUES ('sca.expire_timeouts', %s, %s, now() + interval '1 year')""",
                     (json.dumps({"slot": SLOT.isoformat()}), slot_key("sca.expire_timeouts", SLOT)))
    assert fire(SCA_EVERY_MINUTE, SLOT, "leader-1") is True
    fired = sql("""SELECT o.available_at <= now() AS due FROM scheduler_fires f
                     JOIN job_outbox o ON o.id = f.outbox_id""")
    assert fired == [{"due": True}]  # enqueued under a fresh key, due now
    assert "Internal job key taken" in json.dumps(slack.wait(1)[0].json())


def test_same_slot_fired_again_is_a_duplicate_not_an_alert(db, sql, slack):  # noqa: F811
    assert fire(SCA_EVERY_MINUTE, SLOT, "leader-1") is True
    assert fire(SCA_EVERY_MINUTE, SLOT, "leader-2") is False
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 1
    assert slack.requests == []


def test_scheduler_never_records_a_fire_that_enqueued_nothing(db, sql):
    with pytest.raises(psycopg.errors.CheckViolation, match="scheduler_fires_fired_enqueued"):
        sql("INSERT INTO scheduler_fires (job, slot, status, leader) VALUES ('pisp.sweep', now(), 'fired', 'x')")
    sql("INSERT INTO scheduler_fires (job, slot, status, leader) VALUES ('pisp.sweep', now(), 'missed', 'x')")


def test_pre_inserted_aml_key_does_not_skip_the_aml_check(db, sql, secret):  # noqa: F811
    from jobs.kyc_rules import parse_event

    add_user(sql, USER, "applicant-aml")
    red = event("FINAL", applicant="applicant-aml",
                reviewResult={"reviewAnswer": "RED", "reviewRejectType": "FINAL", "rejectLabels": ["SANCTIONS"]})
    event_id = parse_event(json.dumps(red).encode()).event_id  # what the web tier can derive from the body
    caller_insert(db, "housekeeping.prune", f"kyc.aml_check:{event_id}")
    with pytest.raises(psycopg.errors.CheckViolation):
        caller_insert(db, "housekeeping.prune", f"drop:kyc.aml_check:{event_id}")
    assert deliver(red) == "applied"
    aml = sql("SELECT payload, idempotency_key FROM job_outbox WHERE job = 'kyc.aml_check'")
    assert aml == [{"payload": {"applicant_id": "applicant-aml", "user_id": USER, "event_id": event_id},
                    "idempotency_key": f"drop:kyc.aml_check:{event_id}"}]

