"""Local stand-ins for Slack and Sentry: tiny HTTP receivers on loopback that record requests."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Captured:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers POSTs with the queued responses (status, headers, body), then 200 "ok"."""

    responses: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    requests: list[Captured] = field(default_factory=list)
    hang: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def wait(self, n: int, timeout: float = 10.0) -> list[Captured]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= n:
                    return list(self.requests)
            time.sleep(0.02)
        raise AssertionError(f"expected {n} request(s), got {len(self.requests)}")


def _start_receiver(receiver: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            elif self.headers.get("Content-Encoding") == "deflate":
                body = zlib.decompress(body)
            with receiver.lock:
                receiver.requests.append(Captured(self.path, dict(self.headers), body, time.monotonic()))
                response = receiver.responses.pop(0) if receiver.responses else (200, {}, b"ok")
            if receiver.hang:
                time.sleep(30)
                return
            status, headers, payload = response
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.server = _start_receiver(r)
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def slack(receiver, monkeypatch, redis_namespace) -> Iterator[Receiver]:
    """SLACK_WEBHOOK_URL → the local receiver; the process notifier rebuilt around it."""
    from worker.settings import get_settings
    from worker.slack import reset_notifier

    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"{receiver.url}/services/T000/B000/secret-token")
    monkeypatch.setenv("DROP_SLACK_MIN_INTERVAL_S", "0.05")
    get_settings.cache_clear()
    reset_notifier()
    yield receiver
    reset_notifier()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung dependency)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    yield sock.getsockname()[1]
    stop.set()
    for c in held:
        c.close()
    sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
