"""The `dramatiq` command with the project's logging in every one of its processes.

`python -m dramatiq` formats its own lines (`[date] [PID] [thread] [logger] [LEVEL] msg`) with
`logging.basicConfig` at INFO in the master and in each worker and fork process, whatever
DROP_LOG_LEVEL says, so in production plain lines interleaved with our JSON ones. This entry
point sets up worker.logs first (format per environment, DROP_LOG_LEVEL) and runs Dramatiq's
CLI with `--skip-logging`: the worker and fork processes are forked from here and keep that
set-up; their handler follows `sys.stderr`, which Dramatiq points at its logging pipe.
"""

from __future__ import annotations

import sys

from dramatiq.cli import main as dramatiq_main

from worker.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--skip-logging" not in args:
        args.append("--skip-logging")
    sys.argv = [sys.argv[0], *args]  # the relay fork re-reads the CLI's arguments (worker.relay)
    return int(dramatiq_main() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
