"""The monitor process: `GET /v1/health` and `GET /metrics` (system-wide gauges)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitoring import console, rules
from monitoring.health import run_checks
from monitoring.metrics import REGISTRY
from worker import alerts
from worker.process import start_process
from worker.sentry import flush as sentry_flush

log = logging.getLogger("monitor")

# The checks and the metrics collection are blocking calls: they run on a small pool of their
# own, so a flood of requests queues there instead of starting a thread each.
HANDLER_THREADS = 4
# An HTTP/1.1 keep-alive connection left idle is closed after this long.
KEEPALIVE_TIMEOUT_S = 5.0
_HEADERS = {"Cache-Control": "no-store"}
HANDLER_POOL = console.HANDLER_POOL


async def _health(request: web.Request) -> web.Response:
    status, body = await asyncio.get_running_loop().run_in_executor(request.app[HANDLER_POOL], run_checks)
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=_HEADERS)


async def _metrics(request: web.Request) -> web.Response:
    payload = await asyncio.get_running_loop().run_in_executor(request.app[HANDLER_POOL], generate_latest, REGISTRY)
    response = web.Response(status=200, body=payload, headers=_HEADERS)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def _not_found(request: web.Request) -> web.Response:
    return web.Response(status=404, body=b'{"error":"not found"}', content_type="application/json",
                        headers=_HEADERS)


class MonitorServer:
    """The monitor's HTTP server: aiohttp on an event loop of its own thread.

    An event loop, not a thread per connection: idle or deliberately slow connections
    (slowloris) cost a little memory each, never a thread, so `/v1/health` keeps answering.
    Request lines and headers are size-limited by aiohttp (8 KiB a line/field, 32 fields here)."""

    def __init__(self, host: str, port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(max_workers=HANDLER_THREADS, thread_name_prefix="monitor-handler")
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self.server_address: tuple[str, int] = (host, port)
        self._thread = threading.Thread(target=self._run, args=(host, port), name="monitor-http", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app[HANDLER_POOL] = self._pool
        app.router.add_get("/v1/health", _health)
        app.router.add_get("/metrics", _metrics)
        console.install(app)  # /console, only when DROP_CONSOLE_USERS is set
        app.router.add_route("*", "/{tail:.*}", _not_found)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT_S,
                                     max_field_size=8190, max_line_size=8190, max_headers=32)
        try:
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port, backlog=128)
            self._loop.run_until_complete(site.start())
            self.server_address = self._runner.addresses[0][:2]
        except BaseException as error:  # e.g. the port is taken: raised in the caller's thread
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()
        self._stopped.set()

    def shutdown(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._stopped.wait(10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def server_close(self) -> None:
        """Kept for callers written against http.server; shutdown() already closed the socket."""


def serve(host: str, port: int) -> MonitorServer:
    return MonitorServer(host, port)


def main() -> int:
    run = start_process("monitor")
    settings = run.settings
    server = serve(settings.monitor_host, settings.monitor_port)
    log.info("monitor listening on http://%s:%d (/v1/health, /metrics%s)", settings.monitor_host, settings.monitor_port,
             ", /console" if settings.console_users else "")
    rules.start(run.stop, settings.monitor_eval_interval_s)
    alerts.process_started("monitor", f"drop-monitor is up (alert rules every {settings.monitor_eval_interval_s:g} s).")
    run.stop.wait()
    alerts.process_stopping("monitor", f"{run.reason} received; the monitor is shutting down.")
    server.shutdown()
    sentry_flush()
    log.info("monitor stopped")
    return 0
