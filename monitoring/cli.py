"""`drop-jobs`: the operator's command line.

drop-jobs run                  start everything (embedded servers when URLs are unset)
drop-jobs migrate              apply pending SQL migrations
drop-jobs enqueue NAME JSON    enqueue a job through the outbox
drop-jobs status [--json]      queues, dead letters, breakers, scheduler, outbox at a glance
drop-jobs dlq list|show|replay|purge
drop-jobs demo                 load demo data and enqueue demo jobs
drop-jobs console hash-password  a password (standard input) → a hash for DROP_CONSOLE_USERS
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import honcho.manager
import psycopg
import redis
from honcho.environ import parse_procfile
from psycopg.conninfo import conninfo_to_dict

import jobs
from db.audit import Audit
from db.migrate import migrate
from db.pool import database_url
from monitoring import demo
from monitoring import status as status_view
from monitoring.console.auth import hash_password
from worker import dlq
from worker.embedded import EmbeddedUnavailable, ensure_services
from worker.logs import setup_logging
from worker.pii import scrub_text
from worker.redis_client import redis_from_url
from worker.settings import ConfigurationError, Settings, get_settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------------


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=False))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows]
    return "\n".join(lines)


# --- commands ------------------------------------------------------------------------------


def cmd_migrate(_: argparse.Namespace) -> int:
    applied = migrate(database_url())
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as error:
        print(f"payload is not valid JSON: {error.msg} at position {error.pos}", file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print("payload must be a JSON object", file=sys.stderr)
        return 2
    try:
        outbox_id = jobs.enqueue(args.name, payload, idempotency_key=args.key)
    except (jobs.UnknownJobError, jobs.ReservedKeyError, jobs.InvalidPayload) as error:
        print(str(error), file=sys.stderr)
        return 2
    if outbox_id is None:
        print(f"already enqueued (idempotency key {args.key!r}); nothing done")
    else:
        print(f"enqueued {args.name} as outbox row {outbox_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    redis_reachable = not getattr(args, "redis_unreachable", False)
    if args.json:
        print(json.dumps(status_view.collect_status(redis_reachable=redis_reachable), default=str, indent=2))
        return 0 if redis_reachable else 2
    out = status_view.console()
    if not args.watch or not redis_reachable:
        status_view.render(status_view.collect_status(redis_reachable=redis_reachable), out)
        return 0 if redis_reachable else 2
    try:
        while True:
            current = status_view.collect_status()  # gathered first: the screen never blinks empty
            out.clear()
            out.print(f"drop-jobs status  {status_view.oslo(datetime.now(UTC))} Oslo  "
                      f"(every {args.watch:g} s, Ctrl-C to stop)\n")
            status_view.render(current, out)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _cli_audit(action: str, args: argparse.Namespace) -> Audit:
    """An operator's dlq action from the shell is audited like one from the console."""
    try:
        operator = getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        operator = "unknown"
    return Audit(f"cli.dlq.{action}", {"operator": operator, "job": args.job, "all": bool(args.all)})


def cmd_dlq(args: argparse.Namespace) -> int:
    if args.dlq_command == "list":
        rows = dlq.list_dead_letters(limit=args.limit, job=args.job)
        if not rows:
            print("no open dead letters")
            return 0
        print(
            _table(
                [
                    [r["id"], r["job"], r["failed_at"].isoformat(timespec="seconds"), r["retries"],
                     scrub_text(r["reason"] or "")[:80]]
                    for r in rows
                ],
                ["id", "job", "failed at", "retries", "reason"],
            )
        )
        return 0
    if args.dlq_command == "show":
        row = dlq.get_dead_letter(args.id)
        if row is None:
            print(f"no dead letter {args.id}", file=sys.stderr)
            return 1
        # Payload keys only: the values may hold personal data (webhook bodies).
        print(json.dumps(dlq.describe(row), default=str, indent=2))
        return 0
    if not args.ids and not args.all:
        print("name dead-letter ids, or --all", file=sys.stderr)
        return 2
    ids = None if args.all else args.ids
    if args.dlq_command == "replay":
        count = dlq.replay(ids, job=args.job, audit=_cli_audit("replay", args))
        print(f"replayed {count} dead letter(s)")
        return 0
    if args.dlq_command == "purge":
        if not args.yes:
            print("purge deletes dead letters for good; add --yes", file=sys.stderr)
            return 2
        count = dlq.purge(ids, job=args.job, audit=_cli_audit("purge", args))
        print(f"purged {count} dead letter(s)")
        return 0
    return 2


def cmd_console(args: argparse.Namespace) -> int:
    """`console hash-password`: the password from standard input (typed twice on a terminal,
    never echoed; else its first line), its Argon2id hash on standard output."""
    if sys.stdin.isatty():
        password = getpass.getpass("console password: ")
        if getpass.getpass("again: ") != password:
            print("the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if len(password) < 12:
        print("a console password needs at least 12 characters", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if get_settings().drop_env != "development":
        # The demo writes fake users, payments and KYC reviews: never into a real database.
        print(f"drop-jobs demo runs only with DROP_ENV=development (it is {get_settings().drop_env})",
              file=sys.stderr)
        return 2

    demo.run_demo(watch=not args.no_watch, timeout=args.timeout)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Start the whole system: embedded servers if needed, migrate, Procfile, demo progress."""


    settings = load_settings()
    setup_logging()
    taken = ports_in_use(settings)
    if taken:
        for line in taken:
            print(f"drop-jobs: {line}", file=sys.stderr)
        return 2
    try:
        services = ensure_services(settings.database_url, settings.redis_url, settings.data_dir)
    except EmbeddedUnavailable as error:
        print(f"drop-jobs: {error}", file=sys.stderr)
        return 2
    env = dict(os.environ, DATABASE_URL=services.database_url or "", REDIS_URL=services.redis_url or "")
    embedded_env = None
    if not (settings.database_url and settings.redis_url):
        # Where a `drop-jobs status` in a second shell finds the embedded servers of this run.
        embedded_env = write_embedded_env(settings.data_dir, env["DATABASE_URL"], env["REDIS_URL"])
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Procfile lines say `python`: make that the interpreter drop-jobs runs under (the venv's).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if settings.drop_env == "development":
        # Development talks to the sandbox simulator unless real provider URLs are given.
        sandbox_url = f"http://{settings.sandbox_host}:{settings.sandbox_port}"
        env.setdefault("NEONOMICS_API_URL", sandbox_url)
        env.setdefault("SUMSUB_API_URL", sandbox_url)
        env.setdefault("NEONOMICS_CLIENT_ID", "sandbox-client")
        env.setdefault("NEONOMICS_CLIENT_SECRET", "sandbox-secret")
        env.setdefault("SUMSUB_APP_TOKEN", "sandbox-app-token")
        env.setdefault("SUMSUB_SECRET_KEY", "sandbox-secret-key")
    os.environ.update(env)  # the demo (in this process) uses the same settings as the Procfile
    get_settings.cache_clear()
    try:
        cmd_migrate(args)
        # honcho SIGKILLs what is still running 5 s after Ctrl-C; give in-flight jobs the time
        # of one provider call (30 s) to finish. Whatever is killed is requeued by Dramatiq.
        honcho.manager.KILL_WAIT = 35
        manager = honcho.manager.Manager()
        procfiles = [ROOT / "Procfile"]
        if settings.drop_env == "development":
            procfiles.append(ROOT / "Procfile.dev")  # the provider sandbox
        for procfile in procfiles:
            for name, command in parse_procfile(procfile.read_text()).processes.items():
                manager.add_process(name, command, env=env, cwd=str(ROOT))
        finished = threading.Event()
        if not args.no_demo:
            threading.Thread(
                target=demo.run_demo,
                kwargs={"watch": True, "timeout": args.demo_timeout, "should_stop": finished.is_set},
                name="demo",
                daemon=True,
            ).start()
        manager.loop()  # until Ctrl-C / SIGTERM, or one process exits: then all are stopped
        finished.set()
    finally:
        if embedded_env is not None:
            embedded_env.unlink(missing_ok=True)
        services.stop()
        print("drop-jobs: stopped", flush=True)
    # Stopped by Ctrl-C / SIGTERM (honcho reports 130 / 143): that is a clean stop, not an error.
    return 0 if manager.returncode in (None, 0, 130, 143) else int(manager.returncode)


# --- entry point ---------------------------------------------------------------------------


def ports_in_use(settings: Settings) -> list[str]:
    """Before `run` starts anything: each port it needs that something else holds, with the
    variable to change (a second `make run` beside the first would otherwise die half-way, after
    its demo had driven the first one's sandbox)."""

    wanted = [("DROP_MONITOR_PORT", settings.monitor_host, settings.monitor_port),
              ("DROP_WORKER_METRICS_PORT", settings.monitor_host, settings.worker_metrics_port),
              ("DROP_SCHEDULER_METRICS_PORT", settings.monitor_host, settings.scheduler_metrics_port)]
    if settings.drop_env == "development":
        wanted.append(("DROP_SANDBOX_PORT", settings.sandbox_host, settings.sandbox_port))
    taken = []
    for variable, host, port in wanted:
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                taken.append(f"port {port} on {host} is already in use (is another `drop-jobs run` running?); "
                             f"set {variable} to a free port")
    return taken

EMBEDDED_ENV_FILE = "embedded.env"


def write_embedded_env(data_dir: Path, database_url: str, redis_url: str) -> Path:
    """The running embedded servers' URLs, for the CLI in another shell (mode 0600, local only)."""
    path = data_dir.resolve() / EMBEDDED_ENV_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(f"DATABASE_URL={database_url}\nREDIS_URL={redis_url}\n")
    return path


def use_embedded_servers_of_a_run() -> str | None:
    """With DATABASE_URL/REDIS_URL unset, take those of a `drop-jobs run` of this checkout that
    is running (its data dir's embedded.env); return the file used, or None."""
    if os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"):
        return None
    path = Path(os.environ.get("DROP_DATA_DIR", ".data")).resolve() / EMBEDDED_ENV_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition("=")
        if name in ("DATABASE_URL", "REDIS_URL") and value and not os.environ.get(name):
            os.environ[name] = value
    get_settings.cache_clear()
    return str(path)


EXAMPLES = {
    "drop-jobs": """examples:
  drop-jobs run                      everything on this machine (embedded servers if no URLs)
  drop-jobs status --watch 2         the system at a glance, redrawn every 2 s
  drop-jobs dlq list --job kyc.sumsub_webhook
  drop-jobs dlq replay 17 18         send two dead letters again once the cause is fixed

The servers: DATABASE_URL and REDIS_URL, else the embedded ones of a running `drop-jobs run`
in this checkout (its .data/ directory).""",
    "run": """examples:
  drop-jobs run                      worker, scheduler, monitor, sandbox and the demo
  drop-jobs run --no-demo            the same without demo data

A port already taken (another instance?) is refused before anything starts, naming the port
and the variable that moves it (DROP_MONITOR_PORT, DROP_SANDBOX_PORT, …).""",
    "enqueue": """examples:
  drop-jobs enqueue housekeeping.prune '{}'
  drop-jobs enqueue aisp.refresh_account '{"bank_account_id": "acct_1"}' --key aisp:acct_1:manual-1

The payload is checked against the job's parameters first; a refusal names the field.""",
    "status": """examples:
  drop-jobs status                   verdict first, then workers, queues, outbox, failures, schedules
  drop-jobs status --watch 2         redraw every 2 s until Ctrl-C
  drop-jobs status --json | jq .attention""",
    "dlq": """examples:
  drop-jobs dlq list --job pisp.poll_status --limit 20
  drop-jobs dlq show 17              reason (scrubbed), retries, payload keys (never values)
  drop-jobs dlq replay 17 18         or: drop-jobs dlq replay --all --job kyc.sumsub_webhook
  drop-jobs dlq purge 17 --yes       delete for good (the outbox row keeps its outcome)""",
    "console": """examples:
  drop-jobs console hash-password    type the password twice; prints the HASH of name:role:HASH
  printf '%s\\n' "$PASSWORD" | drop-jobs console hash-password

Then DROP_CONSOLE_USERS='kari:operator:HASH,ola:viewer:HASH' (single quotes: the hash has '$').""",
    "demo": """examples:
  drop-jobs demo                     demo users, accounts and payments, with progress
  drop-jobs demo --no-watch          enqueue and return""",
}


def _parser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drop-jobs", description="drop-worker operations",
                                     epilog=EXAMPLES["drop-jobs"], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _parser(sub, "run", "start worker, scheduler, monitor and sandbox (Procfile), embedded servers if needed")
    run.add_argument("--no-demo", action="store_true", help="do not load demo data")
    run.add_argument("--demo-timeout", type=float, default=150.0, metavar="SECONDS",
                     help="stop printing demo progress after this many seconds (default 150)")
    run.set_defaults(func=cmd_run)

    _parser(sub, "migrate", "apply pending SQL migrations (db/migrations), each once").set_defaults(func=cmd_migrate)

    enqueue = _parser(sub, "enqueue", "enqueue a job through the outbox (as the web tier does)")
    enqueue.add_argument("name", help="job name, e.g. housekeeping.prune")
    enqueue.add_argument("payload", help="the job's parameters as a JSON object, e.g. '{}'")
    enqueue.add_argument("--key", help="idempotency key: the same key enqueues once (default: random)")
    enqueue.set_defaults(func=cmd_enqueue)

    status = _parser(sub, "status", "is it healthy: verdict, workers, queues, outbox, dead letters, breakers, "
                                    "schedules")
    status.add_argument("--json", action="store_true", help="the same, as JSON")
    status.add_argument("--watch", type=float, metavar="SECONDS", default=0,
                        help="redraw every SECONDS seconds until Ctrl-C (e.g. --watch 2)")
    status.set_defaults(func=cmd_status)

    dlq = _parser(sub, "dlq", "dead letters: list, show, replay, purge")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    lst = dsub.add_parser("list", help="open dead letters, newest first")
    lst.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    lst.add_argument("--job", help="only dead letters of this job, e.g. kyc.sumsub_webhook")
    show = dsub.add_parser("show", help="one dead letter: reason, retries, payload keys (never values)")
    show.add_argument("id", type=int, help="dead-letter id from `dlq list`")
    for name, what in (("replay", "send again (an outbox job keeps its idempotency key)"),
                       ("purge", "delete for good (its outbox row keeps the outcome)")):
        p = dsub.add_parser(name, help=what)
        p.add_argument("ids", nargs="*", type=int, help="dead-letter ids from `dlq list`")
        p.add_argument("--all", action="store_true", help="every open dead letter (with --job: of that job)")
        p.add_argument("--job", help="only dead letters of this job")
        if name == "purge":
            p.add_argument("--yes", action="store_true", help="confirm: purged dead letters cannot be replayed")
    dlq.set_defaults(func=cmd_dlq)

    console = _parser(sub, "console", "the operations console (docs/console.md): hash a user's password")
    csub = console.add_subparsers(dest="console_command", required=True, metavar="ACTION",
                                  help="hash-password: a hash for DROP_CONSOLE_USERS")
    csub.add_parser("hash-password", help="read a password from standard input, print its hash for DROP_CONSOLE_USERS")
    console.set_defaults(func=cmd_console)

    demo = _parser(sub, "demo", "load demo data and enqueue demo jobs (DROP_ENV=development only)")
    demo.add_argument("--no-watch", action="store_true", help="enqueue and return without printing progress")
    demo.add_argument("--timeout", type=float, default=150.0, metavar="SECONDS",
                      help="stop printing progress after this many seconds (default 150)")
    demo.set_defaults(func=cmd_demo)
    return parser


# Commands that need the servers, and whether they need Redis besides PostgreSQL.
NEEDS_SERVERS = {"status": True, "dlq": True, "enqueue": False, "migrate": False}


def unreachable_servers(*, need_redis: bool) -> list[str]:
    """One line per server that cannot be reached, naming it, where and why (never a URL: it
    may carry a password), found within a few seconds instead of a pool's 10 s timeout."""


    settings = get_settings()
    problems = []
    if settings.database_url:
        try:
            where = conninfo_to_dict(settings.database_url)
            place = f"{where.get('host', 'localhost')}:{where.get('port', 5432)}"
        except psycopg.Error:
            place = "?"
        try:
            psycopg.connect(settings.database_url, connect_timeout=3).close()
        except psycopg.Error as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            why = scrub_text(first.rsplit("failed: ", 1)[-1]).removeprefix("FATAL:").strip()
            problems.append(f"PostgreSQL at {place} is unreachable: {why} (check DATABASE_URL)")
    if need_redis and settings.redis_url:
        client = redis_from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        except redis.exceptions.RedisError as error:
            kwargs = client.connection_pool.connection_kwargs
            place = (f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}" if "host" in kwargs
                     else f"the Sentinel-managed primary {getattr(client.connection_pool, 'service_name', '?')}")
            problems.append(f"Redis at {place} is unreachable: {type(error).__name__} (check REDIS_URL)")
        finally:
            client.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run" and (found := use_embedded_servers_of_a_run()):
        print(f"drop-jobs: using the embedded PostgreSQL and Redis of the running `drop-jobs run` ({found})",
              file=sys.stderr)
    try:
        get_settings()
    except ConfigurationError as error:
        print(f"drop-worker: configuration error: {error}", file=sys.stderr)
        return 2
    if args.command != "run":
        setup_logging("WARNING")
    if args.command in NEEDS_SERVERS:
        problems = unreachable_servers(need_redis=NEEDS_SERVERS[args.command])
        for problem in problems:
            print(f"drop-jobs: {problem}", file=sys.stderr)
        if args.command == "status" and problems and all(p.startswith("Redis ") for p in problems):
            args.redis_unreachable = True  # the PostgreSQL half of the picture is still worth showing
        elif problems:
            return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
