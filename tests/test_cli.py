"""`drop-jobs`: what on-call types at 3 a.m."""

import json

from jobs.registry import registry
from monitoring.cli import main
from tests.conftest import wait_for
from worker.relay import relay_once

CALLS: list[str] = []


@registry.job("test.cli_fails_until_fixed", queue="test")
def fails_until_fixed(tag: str) -> None:
    CALLS.append(tag)
    if "fixed" not in CALLS:
        raise ValueError("downstream rejected the request")


IN_FLIGHT: list = []


@registry.job("test.cli_holds", queue="test")
def holds() -> None:
    IN_FLIGHT[-1].wait(20)


def test_enqueue_and_status(db, sql, broker, capsys):
    assert main(["enqueue", "housekeeping.prune", "{}", "--key", "k1"]) == 0
    assert "enqueued housekeeping.prune" in capsys.readouterr().out
    assert main(["enqueue", "housekeeping.prune", "{}", "--key", "k1"]) == 0
    assert "already enqueued" in capsys.readouterr().out
    assert main(["enqueue", "no.such", "{}"]) == 2
    assert "unknown job 'no.such'" in capsys.readouterr().err
    assert main(["enqueue", "housekeeping.prune", "{not json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    # A payload the job could never run with is refused in one line naming the field, not dead-lettered.
    assert main(["enqueue", "aisp.refresh_account", "{}"]) == 2
    assert capsys.readouterr().err.strip() == "aisp.refresh_account needs the field 'bank_account_id'"

    relay_once()
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    maintenance = next(q for q in status["queues"] if q["queue"] == "maintenance")
    assert maintenance["ready"] == 1
    assert status["outbox"]["pending"] == 1 and status["outbox"]["unrelayed"] == 0
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    for heading in ("QUEUES", "OUTBOX", "DEAD LETTERS", "BREAKERS", "SCHEDULER"):
        assert heading in text
    # The verdict first: no relay loop and no scheduler run here, and it says so.
    lines = text.splitlines()
    assert lines[0].startswith("ATTENTION")
    assert "  - no outbox relay alive: nothing new reaches the queues" in lines
    assert "  - no scheduler leader: periodic jobs do not fire" in lines
    assert "outbox relays alive 0" in text and status["workers"]["relays"] == 0
    assert "\x1b[" not in text  # piped: no colour codes
    # Every schedule is listed with its next fire time, also those that never fired.
    schedules = {s["job"]: s for s in status["schedules"]}
    assert set(schedules) == {"aisp.refresh_all", "sca.expire_timeouts", "pisp.sweep", "housekeeping.prune"}
    assert all(s["next_fire"] and s["last_status"] is None for s in schedules.values())
    prune_line = next(line for line in lines if line.startswith("housekeeping.prune"))
    assert " 03:30:00 " in prune_line and "never fired" in prune_line


def test_dlq_list_show_replay_purge(db, sql, worker, relay, capsys):
    CALLS.clear()
    import jobs

    for n in range(2):
        jobs.enqueue("test.cli_fails_until_fixed", {"tag": f"attempt-{n}"})
    wait_for(lambda: len(sql("SELECT id FROM dead_letters")) == 2, what="two dead letters")

    assert main(["dlq", "list"]) == 0
    out = capsys.readouterr().out
    assert out.count("test.cli_fails_until_fixed") == 2 and "downstream rejected the request" in out

    ids = [r["id"] for r in sql("SELECT id FROM dead_letters ORDER BY message->'kwargs'->>'tag'")]
    assert main(["dlq", "show", str(ids[0])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["payload_keys"] == ["tag"] and "attempt-0" not in json.dumps(shown)  # keys, never values

    CALLS.append("fixed")  # the downstream problem is fixed; replay one
    assert main(["dlq", "replay", str(ids[0])]) == 0
    assert "replayed 1" in capsys.readouterr().out
    wait_for(
        lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL")[0]["n"] == 1,
        what="replayed job done",
    )
    assert CALLS.count("attempt-0") == 2 and CALLS.count("attempt-1") == 1

    assert main(["dlq", "purge", "--all"]) == 2  # needs --yes
    assert main(["dlq", "purge", "--all", "--yes"]) == 0
    assert "purged 1" in capsys.readouterr().out
    # Both actions are in audit_log with who did it and the ids touched, as from the console.
    audited = sql("SELECT action, details FROM audit_log WHERE action LIKE 'cli.dlq.%%' ORDER BY id")
    assert [a["action"] for a in audited] == ["cli.dlq.replay", "cli.dlq.purge"]
    assert audited[0]["details"]["dead_letter_ids"] == [ids[0]] and audited[0]["details"]["operator"]
    assert sql("SELECT count(*) AS n FROM dead_letters WHERE replayed_at IS NULL")[0]["n"] == 0
    assert main(["dlq", "list"]) == 0
    assert "no open dead letters" in capsys.readouterr().out
    # Every view of the two failures is clear: no dead letter, no rejected outbox row, nothing
    # left in Dramatiq's Redis dead set, nothing for on-call to look at.
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["dead_letters"] == [] and status["outbox"]["rejected"] == 0
    assert next(q for q in status["queues"] if q["queue"] == "test")["dead"] == 0
    assert not [p for p in status["attention"] if "dead letter" in p or "rejected" in p]


def test_status_counts_jobs_in_flight(db, sql, worker, relay, capsys):
    import threading

    import jobs

    release = threading.Event()
    IN_FLIGHT.append(release)
    try:
        jobs.enqueue("test.cli_holds", {})
        wait_for(lambda: main(["status", "--json"]) == 0 and next(
            q for q in json.loads(capsys.readouterr().out)["queues"] if q["queue"] == "test")["in_flight"] == 1,
            timeout=20, what="one job in flight")
    finally:
        release.set()
    wait_for(lambda: sql("SELECT count(*) AS n FROM job_outbox WHERE done_at IS NOT NULL")[0]["n"] == 1,
             what="the held job done")
    assert main(["status", "--json"]) == 0
    assert next(q for q in json.loads(capsys.readouterr().out)["queues"] if q["queue"] == "test")["in_flight"] == 0


def test_status_in_a_second_shell_finds_the_embedded_servers_of_a_run(db, redis_namespace, tmp_path):
    """`make run` on embedded servers, `drop-jobs status` in another shell without any URL set."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from monitoring.cli import write_embedded_env
    from tests.conftest import BASE_REDIS_URL

    written = write_embedded_env(tmp_path, db, BASE_REDIS_URL)
    assert oct(written.stat().st_mode & 0o777) == "0o600"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(DROP_DATA_DIR=str(tmp_path), DROP_REDIS_NAMESPACE=redis_namespace)
    proc = subprocess.run([sys.executable, "-m", "monitoring.cli", "status"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "using the embedded PostgreSQL and Redis of the running `drop-jobs run`" in proc.stderr
    assert "Traceback" not in proc.stderr and "OUTBOX" in proc.stdout


def test_unreachable_servers_are_one_line_each_not_tracebacks(db):
    import os
    import subprocess
    import sys
    from pathlib import Path
    from urllib.parse import urlsplit, urlunsplit

    from tests.conftest import BASE_DATABASE_URL

    # The path is the database name in any URL form (the embedded server's names a socket in its query).
    wrong_db = urlunsplit(urlsplit(BASE_DATABASE_URL)._replace(path="/no_such_database"))
    env = {**os.environ, "DATABASE_URL": wrong_db, "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run([sys.executable, "-m", "monitoring.cli", "status"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in proc.stderr
    assert lines[0].startswith("drop-jobs: PostgreSQL at ") and 'database "no_such_database" does not exist' in lines[0]
    assert lines[1] == "drop-jobs: Redis at 127.0.0.1:1 is unreachable: ConnectionError (check REDIS_URL)"


def test_status_with_redis_gone_still_shows_the_postgresql_half(db, sql):
    import os
    import subprocess
    import sys
    from pathlib import Path

    sql("INSERT INTO dead_letters (message_id, job, queue_name, message, reason, retries) "
        "VALUES ('m1', 'kyc.sumsub_webhook', 'kyc', '{}', 'PermanentError: bad digest', 0)")
    env = {**os.environ, "DATABASE_URL": db, "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run([sys.executable, "-m", "monitoring.cli", "status"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "drop-jobs: Redis at 127.0.0.1:1 is unreachable: ConnectionError (check REDIS_URL)"
    out = proc.stdout
    assert "Redis unreachable: queues, workers, breakers and the scheduler leader are unknown" in out
    assert "QUEUES  unknown (Redis unreachable)" in out
    assert "DEAD LETTERS  1 open" in out and "kyc.sumsub_webhook" in out
    assert "housekeeping.prune" in out  # the schedules come from the code and PostgreSQL


def test_a_second_run_refuses_a_taken_port_before_starting_anything(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "DROP_MONITOR_PORT": str(port), "DROP_DATA_DIR": str(tmp_path)}
        proc = subprocess.run([sys.executable, "-m", "monitoring.cli", "run", "--no-demo"], capture_output=True,
                              text=True, timeout=60, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr and "DROP_MONITOR_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "postgres").exists()  # nothing was started


def test_every_command_has_examples_and_every_option_says_what_it_takes():
    import argparse

    from monitoring.cli import build_parser

    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        found = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found[name] = child
                    found.update({f"{name} {k}": v for k, v in subparsers(child).items()})
        return found

    parser = build_parser()
    assert "examples:" in (parser.epilog or "")
    commands = subparsers(parser)
    assert {"run", "migrate", "enqueue", "status", "dlq", "demo", "dlq replay"} <= set(commands)
    for name, child in commands.items():
        if " " not in name and name != "migrate":
            assert "examples:" in (child.epilog or ""), f"`drop-jobs {name} --help` shows no examples"
        for action in child._actions:
            if action.dest in ("help", "command", "dlq_command"):
                continue
            assert action.help, f"`drop-jobs {name}`: {action.dest} has no help text"
