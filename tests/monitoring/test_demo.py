"""The `make run` demo drives only its own instance's sandbox (issue 18 item 2: a second
`make run` drove the first one's sandbox and left dead letters in the first one's database)."""

from __future__ import annotations

from monitoring import demo


def test_the_demo_refuses_a_sandbox_that_writes_into_another_database(db, sql, sandbox, capsys):
    sandbox.reset(database_url="postgresql://elsewhere/another_instance")  # the other `make run`'s
    plan = demo.start("t1")
    out = capsys.readouterr().out
    assert plan == {"sandbox": False, "transactions": []}
    assert "writes into another database" in out and "DROP_SANDBOX_PORT" in out
    assert sandbox.count("neonomics.*") == 0 and sandbox.count("sumsub.*") == 0
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 0


def test_the_demo_drives_its_own_sandbox(db, sql, sandbox, capsys):
    plan = demo.start("t2")
    assert plan["sandbox"] is True and len(plan["transactions"]) == 2
    assert sandbox.count("neonomics.initiate") == 2
    jobs = {r["job"] for r in sql("SELECT job FROM job_outbox")}
    assert {"aisp.refresh_account", "pisp.poll_status"} <= jobs
