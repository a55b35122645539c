"""The worker pool entry point (`Procfile: worker`): runs the `dramatiq` CLI, signalled once.

Process managers such as honcho (and systemd's control-group kill) signal every process of the
group, so Dramatiq's worker processes would get SIGTERM twice — once from the manager and once
forwarded by Dramatiq's own master — and treat the second as "kill now", cutting in-flight jobs
short. This wrapper starts the Dramatiq CLI in its own process group and forwards exactly one
signal, so in-flight jobs finish (or are requeued) within the shutdown timeout.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from worker import alerts
from worker.logs import setup_logging
from worker.settings import load_settings

log = logging.getLogger("worker.pool")

# In-flight jobs get this long after SIGTERM; a provider call is bounded by 30 s.
SHUTDOWN_TIMEOUT_MS = 30_000


def dramatiq_command(extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "worker.dramatiq_cli",  # `dramatiq` with the project's log format and level
        "jobs.app",
        "--worker-shutdown-timeout",
        str(SHUTDOWN_TIMEOUT_MS),
        *extra,
    ]


def metrics_env() -> dict[str, str]:
    """Multiprocess Prometheus: every worker process writes to one directory that Dramatiq's
    exposition server reads. It must be in the environment before prometheus_client is first
    imported, or metrics declared by job modules would stay private to each process."""

    settings = load_settings()
    directory = (settings.data_dir / f"prometheus-worker-{settings.worker_metrics_port}").resolve()
    shutil.rmtree(directory, ignore_errors=True)  # stale files would add dead processes' counts
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "prometheus_multiproc_dir": str(directory),
        "dramatiq_prom_db": str(directory),
        "dramatiq_prom_host": os.environ.get("dramatiq_prom_host", settings.monitor_host),
        "dramatiq_prom_port": str(settings.worker_metrics_port),
    }


def _stop_with_parent() -> None:
    """In the child: get SIGTERM when this wrapper dies, even by SIGKILL, so the pool is never
    orphaned (a second, unsupervised worker pool would keep consuming beside its replacement)."""

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


# The relay fork beats every few seconds (more often while it drains); Dramatiq's master does
# not restart a fork that died, so this wrapper stops the pool when the beat has been silent
# this long, and the process manager starts a new one.
RELAY_SILENT_EXIT_CODE = 75  # EX_TEMPFAIL: a restart is the fix


def relay_heartbeat_file() -> Path:
    settings = load_settings()
    directory = settings.data_dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"relay-heartbeat-{os.getpid()}"


def relay_silent_for(heartbeat: Path, started: float) -> float:
    """Seconds since the relay last beat (since the start, before its first beat)."""
    try:
        last = max(heartbeat.stat().st_mtime, started)
    except FileNotFoundError:
        last = started
    return time.time() - last


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    silent_limit = load_settings().relay_silent_limit_s
    heartbeat = relay_heartbeat_file()
    heartbeat.unlink(missing_ok=True)
    started = time.time()
    dramatiq_args = list(sys.argv[1:] if argv is None else argv)
    proc = subprocess.Popen(
        dramatiq_command(dramatiq_args),
        env={**os.environ, **metrics_env(), "DROP_RELAY_HEARTBEAT_FILE": str(heartbeat)},
        start_new_session=True,
        preexec_fn=_stop_with_parent if sys.platform == "linux" else None,
    )
    # One start and one stop message per pool (this wrapper), not one per worker process.
    alerts.process_started("worker", "Worker pool started (" + " ".join(dramatiq_args) + ").")
    signalled: list[str] = []

    def forward(signum: int, _frame: object) -> None:
        if not signalled:
            signalled.append(signal.Signals(signum).name)
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        while True:
            try:
                code = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            else:
                reason = f"{signalled[0]} received; in-flight jobs finished" if signalled else f"exit status {code}"
                alerts.process_stopping("worker", f"Worker pool stopped ({reason}).")
                return code
            if not signalled and relay_silent_for(heartbeat, started) > silent_limit:
                log.error("the outbox relay has not beaten for %.0f s; stopping the pool so the process "
                          "manager restarts it", silent_limit)
                forward(signal.SIGTERM, None)
                proc.wait()
                alerts.process_stopping("worker", f"Worker pool stopped: the outbox relay was silent for "
                                                  f"{silent_limit:.0f} s; the process manager restarts it.")
                return RELAY_SILENT_EXIT_CODE
    finally:
        heartbeat.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
