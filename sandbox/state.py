"""The sandbox's state: configuration, scripted faults, and what providers would hold (accounts,
payments, applicants); shared by every handler through the aiohttp application."""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import hashlib
import random
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from worker.providers.sumsub import DEFAULT_DIGEST_ALG

DEFAULT_BALANCE = "45230.00"
FINAL_STATUSES = frozenset({"ACSC", "ACCC", "RJCT", "CANC"})
SIGNATURE_MAX_AGE_S = 300
MAX_RECORDED = 5000
AMOUNT = re.compile(r"(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,2})?")


@dataclass
class Config:
    token_ttl_s: float = 3600.0
    payment_script: list[str] = field(default_factory=lambda: ["RCVD", "ACTC", "ACCP", "ACSC"])
    # Seed 001 §3.6 mock behaviour.
    approval_rate: float = 0.9
    review_delay_s: float = 3.0
    seed: int | None = None
    webhook_alg: str = DEFAULT_DIGEST_ALG
    # Credentials the sandbox accepts; None = accept any non-empty value.
    client_id: str | None = None
    client_secret: str | None = None
    sumsub_app_token: str | None = None
    sumsub_secret_key: str | None = None
    webhook_secret: str | None = None
    # Where webhooks go: the job_outbox of this database (schema optional). None = memory only.
    database_url: str | None = None
    schema: str | None = None
    # Every /_admin call but /_admin/health must carry it (X-Sandbox-Admin-Token): the admin API
    # signs webhooks with the real webhook secret, so it is no open signing oracle.
    admin_token: str | None = None


@dataclass
class Fault:
    op: str = "*"  # fnmatch pattern over operation names
    status: int | None = None
    code: str | None = None
    rate: float = 1.0
    count: int | None = None  # requests left to affect; None = until cleared
    latency_ms: int = 0
    timeout: bool = False  # hang (the client's timeout fires)
    hang_s: float = 120.0
    disconnect: bool = False
    retry_after: int | None = None
    target: str | None = None  # only this account / payment / applicant id
    id: int = 0
    hits: int = 0


class State:
    def __init__(self, config: Config) -> None:
        self.base_config = config
        self.reset()

    def reset(self, **overrides: Any) -> None:
        for task in getattr(self, "tasks", set()):
            task.cancel()
        self.config = Config(**{**asdict(self.base_config), **overrides})
        self.rng = random.Random(self.config.seed)
        self.tokens: dict[str, float] = {}
        self.accounts: dict[str, dict[str, Any]] = {}
        self.payments: dict[str, dict[str, Any]] = {}
        self.payments_by_request_id: dict[str, str] = {}
        self.applicants: dict[str, dict[str, Any]] = {}
        self.applicants_by_external: dict[str, str] = {}
        self.faults: list[Fault] = []
        self.fault_ids = 0
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_RECORDED)
        self.counts: collections.Counter[str] = collections.Counter()
        self.webhooks: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def pick_fault(self, op: str, target: str | None) -> Fault | None:
        for fault in self.faults:
            if fault.count is not None and fault.count <= 0:
                continue
            if not fnmatch.fnmatchcase(op, fault.op):
                continue
            if fault.target is not None and fault.target != target:
                continue
            if fault.rate < 1.0 and self.rng.random() >= fault.rate:
                continue
            if fault.count is not None:
                fault.count -= 1
            fault.hits += 1
            return fault
        return None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def bg_error(status: int, code: str, text: str = "sandbox") -> web.Response:
    body = {"tppMessages": [{"category": "ERROR", "code": code, "text": text}]}
    return web.json_response(body, status=status)


def sumsub_error(status: int, description: str, error_name: str | None = None) -> web.Response:
    body: dict[str, Any] = {"description": description, "code": status, "correlationId": secrets.token_hex(8)}
    if error_name:
        body["errorName"] = error_name
    return web.json_response(body, status=status)


STATE_KEY = web.AppKey("state", State)


def database_fingerprint(database_url: str | None) -> str:
    """Which database a sandbox writes its webhooks into, without showing the URL: a client
    compares it with its own (a second `make run` must not drive the first one's sandbox)."""
    return hashlib.sha256((database_url or "").encode()).hexdigest()[:16]


def state_of(request: web.Request) -> State:
    return request.app[STATE_KEY]
