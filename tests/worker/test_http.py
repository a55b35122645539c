"""The httpx factory: X-Request-ID on every request, observed at the sandbox over real HTTP."""

import asyncio
import uuid

import pytest

from worker.context import request_id_var
from worker.http import make_async_client, make_client
from worker.retry import ATTEMPT_TIMEOUT_S


def _token_request(client):
    return client.post("/auth/token", data={"grant_type": "client_credentials", "client_id": "x",
                                            "client_secret": "y"})


def test_job_request_id_is_propagated(sandbox):
    token = request_id_var.set("job-req-42")
    try:
        with make_client(sandbox.url) as client:
            _token_request(client)
            _token_request(client)
    finally:
        request_id_var.reset(token)
    assert [r["x_request_id"] for r in sandbox.requests("neonomics.token")] == ["job-req-42", "job-req-42"]


def test_outside_a_job_each_request_gets_a_new_uuid(sandbox):
    with make_client(sandbox.url) as client:
        _token_request(client)
        _token_request(client)
    ids = [r["x_request_id"] for r in sandbox.requests("neonomics.token")]
    assert len(ids) == 2 and ids[0] != ids[1]
    for value in ids:
        uuid.UUID(value)


def test_caller_header_wins(sandbox):
    token = request_id_var.set("job-req")
    try:
        with make_client(sandbox.url) as client:
            client.post("/auth/token", data={"grant_type": "client_credentials"},
                        headers={"X-Request-ID": "idem-key-1"})
    finally:
        request_id_var.reset(token)
    assert sandbox.requests("neonomics.token")[0]["x_request_id"] == "idem-key-1"


def test_async_client_stamps_too(sandbox):
    async def run():
        request_id_var.set("async-req")
        async with make_async_client(sandbox.url) as client:
            await client.post("/auth/token", data={"grant_type": "client_credentials"})

    asyncio.run(run())
    assert sandbox.requests("neonomics.token")[0]["x_request_id"] == "async-req"


def test_timeouts_and_pooling_defaults():
    with make_client("http://127.0.0.1:1") as client:
        assert client.timeout.read == ATTEMPT_TIMEOUT_S == 30.0
        assert client.timeout.connect <= 5.0
        assert client.follow_redirects is False


# --- hostile provider answers: too large, trickled, absurd Retry-After ----------------------


class HostileProvider:
    """A loopback HTTP peer that answers every request in one hostile way (no mocks of httpx)."""

    def __init__(self, mode: str) -> None:
        import socket
        import threading

        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn) -> None:
        import time

        try:
            conn.recv(65536)
            if self.mode == "huge":  # 8 MiB, honestly declared
                size = 8 * 1024 * 1024
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size)
                conn.sendall(b"x" * size)
            elif self.mode == "huge-chunked":  # 8 MiB without a length
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(128):
                    conn.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                conn.sendall(b"0\r\n\r\n")
            elif self.mode == "trickle":  # a byte every 0.2 s: each read is "on time"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
                for _ in range(1000):
                    if self.stop.is_set():
                        break
                    conn.sendall(b" ")
                    time.sleep(0.2)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()



@pytest.mark.parametrize("mode", ["huge", "huge-chunked"])
def test_oversized_provider_response_is_refused(mode):
    import httpx

    from worker.http import ResponseTooLarge

    peer = HostileProvider(mode)
    try:
        with make_client(peer.url, timeout=10) as client, pytest.raises(ResponseTooLarge):
            client.get("/v1/anything")

        async def go() -> None:
            async with make_async_client(peer.url, timeout=10) as client:
                with pytest.raises(ResponseTooLarge):
                    await client.get("/v1/anything")

        asyncio.run(go())
        assert issubclass(ResponseTooLarge, httpx.HTTPError)
    finally:
        peer.close()


def test_trickled_body_is_cut_at_the_attempt_deadline():
    import time

    import httpx

    peer = HostileProvider("trickle")
    try:
        started = time.monotonic()
        with make_client(peer.url, timeout=1.0) as client, pytest.raises(httpx.ReadTimeout):
            client.get("/v1/anything")
        took = time.monotonic() - started
        print(f"trickled body cut after {took:.2f} s (deadline 1 s; the body would take 200 s)")
        assert took < 10  # far below the 200 s the trickle would take

        async def go() -> None:
            async with make_async_client(peer.url, timeout=1.0) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.get("/v1/anything")

        asyncio.run(go())
    finally:
        peer.close()


def test_oversized_response_is_a_permanent_provider_error_not_a_retry_storm():
    from worker.providers.errors import MalformedResponseError
    from worker.providers.sumsub import SumsubClient

    peer = HostileProvider("huge")
    try:
        client = SumsubClient(peer.url, "t" * 20, b"s" * 20)
        with pytest.raises(MalformedResponseError, match="larger than"):
            client._send("sumsub.status", "GET", "/resources/applicants/a1/status")
    finally:
        peer.close()


@pytest.mark.parametrize(("header", "expected"), [
    ("120", 120.0),
    ("99999999999999999999", 6 * 3600.0),
    ("Fri, 01 Jan 2343 00:00:00 GMT", 6 * 3600.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ("-5", None),
    ("²", None),
    ("soon", None),
])
def test_retry_after_is_capped(header, expected):
    from worker.providers.errors import retry_after_seconds

    assert retry_after_seconds(header) == expected


def test_the_async_pool_gets_the_cheap_idle_check():
    # worker.http replaces a private attribute of httpx's transport (its pool's network
    # backend): an httpx/httpcore upgrade that renames it must fail here, not silently slow down.
    import httpcore
    import httpx

    from worker.http import _ReadableCheckBackend, fast_async_transport

    transport = fast_async_transport(httpx.Limits(max_connections=4))
    pool = transport._pool
    assert isinstance(pool, httpcore.AsyncConnectionPool)
    assert isinstance(pool._network_backend, _ReadableCheckBackend)


def test_the_idle_check_sees_a_closed_peer():
    import socket

    from worker.http import _socket_readable

    left, right = socket.socketpair()
    try:
        assert _socket_readable(left) is False  # idle: nothing to read
        right.close()
        assert _socket_readable(left) is True  # the peer hung up: EOF is readable
    finally:
        left.close()
