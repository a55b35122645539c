"""The monitor process: `GET /v1/health` and `GET /metrics` (system-wide gauges)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitoring.health import run_checks
from monitoring.metrics import REGISTRY

log = logging.getLogger("monitor")


class Handler(BaseHTTPRequestHandler):
    server_version = "drop-monitor"

    def log_message(self, fmt: str, *args: object) -> None:  # access logs stay out of stderr
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/v1/health":
            status, body = run_checks()
            self._send(status, json.dumps(body).encode(), "application/json")
        elif path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        else:
            self._send(404, b'{"error":"not found"}', "application/json")


def serve(host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="monitor-http", daemon=True).start()
    return server


def main() -> int:
    import jobs  # noqa: F401  (the broker, for queue probes)
    from monitoring import alerts, rules
    from monitoring.sentry import flush as sentry_flush
    from monitoring.sentry import init_sentry
    from worker.logs import setup_logging
    from worker.settings import load_settings

    settings = load_settings()
    setup_logging()
    alerts.set_process_kind("monitor")
    init_sentry("monitor")
    alerts.install_crash_alerts("monitor")
    server = serve(settings.monitor_host, settings.monitor_port)
    log.info("monitor listening on http://%s:%d (/v1/health, /metrics)", settings.monitor_host, settings.monitor_port)
    stop = threading.Event()
    reason: list[str] = []

    def _stop(signum: int, _frame: object) -> None:
        reason.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    rules.start(stop, settings.monitor_eval_interval_s)
    alerts.process_started("monitor", f"drop-monitor is up (alert rules every {settings.monitor_eval_interval_s:g} s).")
    stop.wait()
    alerts.process_stopping("monitor", f"{reason[0] if reason else 'stop'} received; the monitor is shutting down.")
    server.shutdown()
    sentry_flush()
    log.info("monitor stopped")
    return 0
