"""The httpx factory: X-Request-ID on every request, observed at the sandbox over real HTTP."""

import asyncio
import uuid

from worker.http import make_async_client, make_client
from worker.middleware import request_id_var
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
