"""How a long-running entry point starts and stops (the monitor, the scheduler).

`start_process(kind)`: settings or a one-line configuration error (exit 2), logging through the
PII scrubber, Sentry, crash alerts, and SIGTERM/SIGINT turned into `run.stop`; the caller waits
on that event, then says why it stopped (`run.reason`). The worker pool is Dramatiq's CLI and
starts the same things from its middleware (worker.middleware.SentryJobs).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field

from worker import alerts
from worker.logs import setup_logging
from worker.sentry import init_sentry
from worker.settings import Settings, load_settings

log = logging.getLogger(__name__)


@dataclass
class ProcessRun:
    kind: str
    settings: Settings
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_by: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        """The signal that stopped the process ("stop" if it stopped on its own)."""
        return self.stopped_by[0] if self.stopped_by else "stop"


def start_process(kind: str) -> ProcessRun:
    settings = load_settings()
    setup_logging()
    alerts.set_process_kind(kind)
    init_sentry(kind)
    alerts.install_crash_alerts(kind)
    run = ProcessRun(kind, settings)

    def _stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        log.info("%s received %s, stopping", kind, name)
        run.stopped_by.append(name)
        run.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return run
