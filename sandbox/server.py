"""The provider simulator: Neonomics (Berlin Group) and Sumsub over real HTTP, plus an admin API.

One aiohttp application, all state in memory (reset with POST /_admin/reset). Every provider
request is recorded (operation, method, path, status, X-Request-ID, whether PSU-IP-Address /
X-Consent-ID were sent — never bodies) and counted, so tests can assert what went over the
wire. Faults are scripted per operation: latency, an HTTP status (5xx, 429 with Retry-After),
a hang (the client times out), a dropped connection; for a number of requests or a fraction.

Operations (names used by faults and counts):
  neonomics.token, neonomics.balances, neonomics.initiate, neonomics.status, neonomics.cancel,
  sumsub.create_applicant, sumsub.get_applicant, sumsub.status, sumsub.submit
See docs/sandbox.md for the admin API.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import fnmatch
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from psycopg.rows import dict_row

import jobs
from worker.providers.sumsub import DEFAULT_DIGEST_ALG, sign_request, webhook_digest
from worker.settings import get_settings, is_loopback

log = logging.getLogger("sandbox")

DEFAULT_BALANCE = "45230.00"
FINAL_STATUSES = frozenset({"ACSC", "ACCC", "RJCT", "CANC"})
SIGNATURE_MAX_AGE_S = 300
MAX_RECORDED = 5000
_AMOUNT = re.compile(r"(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,2})?")


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


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bg_error(status: int, code: str, text: str = "sandbox") -> web.Response:
    body = {"tppMessages": [{"category": "ERROR", "code": code, "text": text}]}
    return web.json_response(body, status=status)


def _sumsub_error(status: int, description: str, error_name: str | None = None) -> web.Response:
    body: dict[str, Any] = {"description": description, "code": status, "correlationId": secrets.token_hex(8)}
    if error_name:
        body["errorName"] = error_name
    return web.json_response(body, status=status)


STATE_KEY = web.AppKey("state", State)


def _state(request: web.Request) -> State:
    return request.app[STATE_KEY]


# --- middleware: record, count, inject faults --------------------------------------------------


ADMIN_TOKEN_HEADER = "X-Sandbox-Admin-Token"  # noqa: S105 (a header name, not a secret)


@web.middleware
async def provider_middleware(request: web.Request, handler):
    if request.path.startswith("/_admin"):
        expected = _state(request).config.admin_token
        given = request.headers.get(ADMIN_TOKEN_HEADER, "")
        if request.path != "/_admin/health" and (
                not expected or not hmac.compare_digest(given.encode(), expected.encode())):
            return web.json_response({"error": "admin token required"}, status=401)
        return await handler(request)
    state = _state(request)
    route = request.match_info.route
    op = route.name or "unknown"
    target = next(iter(request.match_info.values()), None) if request.match_info else None
    record = {
        "op": op,
        "method": request.method,
        "path": request.path,
        "x_request_id": request.headers.get("X-Request-ID"),
        "psu_ip_address": "PSU-IP-Address" in request.headers,
        "x_consent_id": request.headers.get("X-Consent-ID"),
        "at": time.time(),
        "status": None,
    }
    state.requests.append(record)
    state.counts[op] += 1
    fault = state.pick_fault(op, target)
    try:
        response = await _apply_fault(request, fault, op) if fault else None
        if response is None:
            response = await handler(request)
    except web.HTTPException as exc:
        record["status"] = exc.status
        raise
    record["status"] = response.status
    return response


async def _apply_fault(request: web.Request, fault: Fault, op: str) -> web.StreamResponse | None:
    if fault.latency_ms:
        await asyncio.sleep(fault.latency_ms / 1000)
    if fault.timeout:
        await asyncio.sleep(fault.hang_s)
        return _bg_error(504, "TIMEOUT", "sandbox hang")
    if fault.disconnect:
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)
    if fault.status is None:
        return None
    headers = {}
    if fault.status == 429 or fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after if fault.retry_after is not None else 1)
    code = fault.code or {429: "ACCESS_EXCEEDED", 404: "RESOURCE_UNKNOWN", 400: "FORMAT_ERROR"}.get(
        fault.status, "INTERNAL_SERVER_ERROR" if fault.status >= 500 else "SANDBOX_FAULT"
    )
    if op.startswith("sumsub."):
        response = _sumsub_error(fault.status, "sandbox fault", code)
    else:
        response = _bg_error(fault.status, code, "sandbox fault")
    response.headers.update(headers)
    return response


# --- Neonomics -------------------------------------------------------------------------------


def _bearer_ok(request: web.Request) -> bool:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        return False
    expiry = _state(request).tokens.get(auth[7:])
    return expiry is not None and expiry > time.time()


async def token(request: web.Request) -> web.Response:
    state = _state(request)
    form = dict(await request.post()) if request.content_type.startswith("application/x-www") else {}
    if request.content_type == "application/json":
        form = await request.json()
    client_id, client_secret = form.get("client_id"), form.get("client_secret")
    basic = request.headers.get("Authorization", "")
    if basic.startswith("Basic "):
        client_id, _, client_secret = base64.b64decode(basic[6:]).decode().partition(":")
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    cfg = state.config
    if not client_id or not client_secret:
        return web.json_response({"error": "invalid_client"}, status=401)
    if (cfg.client_id and client_id != cfg.client_id) or (
        cfg.client_secret and not hmac.compare_digest(str(client_secret), cfg.client_secret)
    ):
        return web.json_response({"error": "invalid_client"}, status=401)
    value = "sbx-" + secrets.token_urlsafe(24)
    state.tokens[value] = time.time() + cfg.token_ttl_s
    return web.json_response(
        {"access_token": value, "token_type": "Bearer", "expires_in": cfg.token_ttl_s}
    )


def _account(state: State, account_id: str) -> dict[str, Any]:
    return state.accounts.setdefault(
        account_id,
        {"amount": DEFAULT_BALANCE, "currency": "NOK", "consent": "valid", "consent_id": None,
         "raw_balances": None},
    )


async def balances(request: web.Request) -> web.Response:
    if not _bearer_ok(request):
        return _bg_error(401, "TOKEN_INVALID")
    state = _state(request)
    consent_id = request.headers.get("X-Consent-ID")
    if not consent_id:
        return _bg_error(400, "FORMAT_ERROR", "X-Consent-ID missing")
    account = _account(state, request.match_info["account_id"])
    if account["consent"] == "expired":
        return _bg_error(403, "CONSENT_EXPIRED")  # docs/providers.md: 403
    if account["consent"] == "invalid":
        return _bg_error(401, "CONSENT_INVALID")
    if account["consent_id"] and account["consent_id"] != consent_id:
        return _bg_error(403, "CONSENT_UNKNOWN")
    if account["raw_balances"] is not None:
        return web.json_response({"balances": account["raw_balances"]})
    amount = {"currency": account["currency"], "amount": account["amount"]}
    now = _now_iso()
    return web.json_response({"balances": [
        {"balanceType": "closingBooked", "balanceAmount": amount, "lastChangeDateTime": now},
        {"balanceType": "expected", "balanceAmount": amount, "lastChangeDateTime": now},
    ]})


async def initiate(request: web.Request) -> web.Response:
    if not _bearer_ok(request):
        return _bg_error(401, "TOKEN_INVALID")
    state = _state(request)
    request_id = request.headers.get("X-Request-ID")
    if not request_id or not request.headers.get("X-Consent-ID"):
        return _bg_error(400, "FORMAT_ERROR", "X-Request-ID and X-Consent-ID are required")
    existing = state.payments_by_request_id.get(request_id)
    if existing is None:
        try:
            body = await request.json()
            amount = body["instructedAmount"]["amount"]
            if not isinstance(amount, str) or not _AMOUNT.fullmatch(amount) or float(amount) <= 0:
                raise ValueError
            body["creditorAccount"]
        except (ValueError, KeyError, TypeError):
            return _bg_error(400, "FORMAT_ERROR", "bad payment body")
        existing = "pay_" + secrets.token_hex(8)
        state.payments[existing] = {"script": list(state.config.payment_script), "index": 0,
                                    "pinned": None, "request_id": request_id, "amount": amount}
        state.payments_by_request_id[request_id] = existing
    payment = state.payments[existing]
    return web.json_response(
        {"paymentId": existing, "transactionStatus": _payment_status(payment),
         "_links": {"scaRedirect": {"href": f"{request.url.origin()}/sca/{existing}"}}},
        status=201,
    )


def _payment_status(payment: dict[str, Any]) -> str:
    return payment["pinned"] or payment["script"][min(payment["index"], len(payment["script"]) - 1)]


async def payment_status(request: web.Request) -> web.Response:
    if not _bearer_ok(request):
        return _bg_error(401, "TOKEN_INVALID")
    payment = _state(request).payments.get(request.match_info["payment_id"])
    if payment is None:
        return _bg_error(404, "RESOURCE_UNKNOWN")
    if payment["pinned"] is None and payment["index"] < len(payment["script"]) - 1:
        payment["index"] += 1  # each poll moves the payment one step along its script
    return web.json_response({"transactionStatus": _payment_status(payment)})


async def cancel(request: web.Request) -> web.Response:
    if not _bearer_ok(request):
        return _bg_error(401, "TOKEN_INVALID")
    payment = _state(request).payments.get(request.match_info["payment_id"])
    if payment is None:
        return _bg_error(404, "RESOURCE_UNKNOWN")
    if _payment_status(payment) in FINAL_STATUSES:
        return _bg_error(400, "CANCELLATION_INVALID")
    payment["pinned"] = "CANC"
    return web.Response(status=204)


async def sca_page(request: web.Request) -> web.Response:
    """A stand-in for the bank's SCA page: ?result=ok|fail settles the payment (dev tool)."""
    payment = _state(request).payments.get(request.match_info["payment_id"])
    if payment is None:
        return web.Response(status=404, text="unknown payment")
    result = request.query.get("result")
    if result in ("ok", "fail"):
        payment["pinned"] = "ACSC" if result == "ok" else "RJCT"
        return web.Response(text=f"payment {request.match_info['payment_id']}: {payment['pinned']}")
    return web.Response(
        content_type="text/html",
        text="<h1>Sandbox bank</h1><a href='?result=ok'>Approve</a> | <a href='?result=fail'>Reject</a>",
    )


# --- Sumsub ----------------------------------------------------------------------------------


async def _sumsub_auth(request: web.Request) -> web.Response | None:
    cfg = _state(request).config
    app_token = request.headers.get("X-App-Token")
    ts = request.headers.get("X-App-Access-Ts")
    sig = request.headers.get("X-App-Access-Sig")
    if not app_token or not ts or not sig or not ts.isdigit():
        return _sumsub_error(401, "App token, timestamp and signature are required")
    if cfg.sumsub_app_token and not hmac.compare_digest(app_token, cfg.sumsub_app_token):
        return _sumsub_error(401, "Unknown app token")
    if abs(time.time() - int(ts)) > SIGNATURE_MAX_AGE_S:
        return _sumsub_error(401, "Request timestamp is too old")
    if cfg.sumsub_secret_key:
        body = await request.read()
        expected = sign_request(cfg.sumsub_secret_key.encode(), ts, request.method, request.raw_path, body)
        if not hmac.compare_digest(expected, sig.lower()):
            return _sumsub_error(401, "Request signature mismatch")
    return None


def _new_applicant(state: State, external_user_id: str, level: str, applicant_id: str | None = None) -> dict:
    applicant_id = applicant_id or secrets.token_hex(12)
    applicant = {"id": applicant_id, "externalUserId": external_user_id, "levelName": level,
                 "createdAt": _now_iso(), "review": {"reviewStatus": "init"}, "riskScore": None,
                 "inspectionId": secrets.token_hex(12), "decision": None}
    state.applicants[applicant_id] = applicant
    state.applicants_by_external[external_user_id] = applicant_id
    return applicant


def _applicant_view(a: dict[str, Any]) -> dict[str, Any]:
    return {"id": a["id"], "externalUserId": a["externalUserId"], "levelName": a["levelName"],
            "createdAt": a["createdAt"], "inspectionId": a["inspectionId"], "review": a["review"]}


async def create_applicant(request: web.Request) -> web.Response:
    if (denied := await _sumsub_auth(request)) is not None:
        return denied
    state = _state(request)
    try:
        body = await request.json()
        external = body["externalUserId"]
        if not isinstance(external, str) or not external:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return _sumsub_error(400, "externalUserId is required")
    existing = state.applicants_by_external.get(external)
    if existing:
        return _sumsub_error(409, f"Applicant with external user id '{external}' already exists: {existing}")
    applicant = _new_applicant(state, external, request.query.get("levelName", "basic-kyc-level"))
    return web.json_response(_applicant_view(applicant), status=201)


async def get_applicant(request: web.Request) -> web.Response:
    if (denied := await _sumsub_auth(request)) is not None:
        return denied
    state = _state(request)
    applicant_id = state.applicants_by_external.get(request.match_info["external_id"])
    if applicant_id is None:
        return _sumsub_error(404, "Applicant not found")
    return web.json_response(_applicant_view(state.applicants[applicant_id]))


async def applicant_status(request: web.Request) -> web.Response:
    if (denied := await _sumsub_auth(request)) is not None:
        return denied
    applicant = _state(request).applicants.get(request.match_info["applicant_id"])
    if applicant is None:
        return _sumsub_error(404, "Applicant not found")
    review = applicant["review"]
    body = {"createDate": applicant["createdAt"], "reviewStatus": review["reviewStatus"], "priority": 0}
    if "reviewResult" in review:
        body["reviewResult"] = review["reviewResult"]
        body["reviewDate"] = review.get("reviewDate")
    if applicant["riskScore"] is not None:
        body["riskScore"] = applicant["riskScore"]  # sandbox extension (docs/sandbox.md)
    return web.json_response(body)


async def submit(request: web.Request) -> web.Response:
    """The user finished the SDK flow: pending now, a decision after `review_delay_s`."""
    if (denied := await _sumsub_auth(request)) is not None:
        return denied
    state = _state(request)
    applicant = state.applicants.get(request.match_info["applicant_id"])
    if applicant is None:
        return _sumsub_error(404, "Applicant not found")
    applicant["review"] = {"reviewStatus": "pending"}
    await emit_event(state, applicant, "applicantPending")
    state.spawn(_review_later(state, applicant["id"], state.config.review_delay_s, None))
    return web.json_response({"ok": 1})


async def _review_later(state: State, applicant_id: str, delay_s: float, decision: dict | None) -> None:
    await asyncio.sleep(delay_s)
    applicant = state.applicants.get(applicant_id)
    if applicant is not None:
        await decide(state, applicant, decision)


async def decide(state: State, applicant: dict[str, Any], decision: dict | None) -> dict[str, Any]:
    """Seed 001 §3.6: 90 % GREEN (risk 15), else RED DOCUMENT_UNREADABLE / RETRY (risk 85)."""
    decision = decision or applicant.get("decision") or {}
    answer = decision.get("answer") or ("GREEN" if state.rng.random() < state.config.approval_rate else "RED")
    result: dict[str, Any] = {"reviewAnswer": answer, "rejectLabels": []}
    if answer == "RED":
        result["rejectLabels"] = decision.get("labels") or ["DOCUMENT_UNREADABLE"]
        result["reviewRejectType"] = decision.get("reject_type") or "RETRY"
        result["moderationComment"] = "Sandbox: document unreadable"
    applicant["review"] = {"reviewStatus": "completed", "reviewResult": result, "reviewDate": _now_iso()}
    applicant["riskScore"] = 15 if answer == "GREEN" else 85
    return await emit_event(state, applicant, "applicantReviewed")


async def emit_event(state: State, applicant: dict[str, Any], event_type: str,
                     extra: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": event_type,
        "applicantId": applicant["id"],
        "inspectionId": applicant["inspectionId"],
        "correlationId": secrets.token_hex(12),
        "externalUserId": applicant["externalUserId"],
        "levelName": applicant["levelName"],
        "sandboxMode": True,
        "reviewStatus": applicant["review"]["reviewStatus"],
        "createdAt": _now_iso(),
    }
    if "reviewResult" in applicant["review"]:
        event["reviewResult"] = applicant["review"]["reviewResult"]
    if applicant.get("riskScore") is not None:
        event["riskScore"] = applicant["riskScore"]
    event.update(extra or {})
    return await emit_webhook(state, json.dumps(event, separators=(",", ":")), **kw)


async def emit_webhook(state: State, body: str, *, alg: str | None = None, forge: bool = False,
                       idempotency_key: str | None = None) -> dict[str, Any]:
    """Sign `body` as Sumsub would and hand it to the system the way the web tier does:
    an outbox row `kyc.sumsub_webhook` {body, headers, received_at}."""
    cfg = state.config
    alg = alg or cfg.webhook_alg
    secret = (cfg.webhook_secret or cfg.sumsub_secret_key or "").encode()
    raw = body.encode()
    digest = webhook_digest(b"forged:" + secret if forge else secret, raw, alg)
    payload = {"body": body, "headers": {"X-Payload-Digest": digest, "X-Payload-Digest-Alg": alg},
               "received_at": _now_iso()}
    idem = idempotency_key or "sumsub:" + hashlib.sha256(raw).hexdigest()[:40]
    record: dict[str, Any] = {"payload": payload, "idempotency_key": idem, "outbox": "no_database"}
    if cfg.database_url:
        try:
            record["outbox"] = await asyncio.to_thread(_insert_outbox, cfg.database_url, cfg.schema, payload, idem)
        except Exception as exc:  # reported through the admin API; the sandbox keeps running
            record["outbox"] = f"error: {type(exc).__name__}"
            log.warning("could not write webhook to job_outbox: %s", type(exc).__name__)
    state.webhooks.append(record)
    return record


def _insert_outbox(dsn: str, schema: str | None, payload: dict[str, Any], idem: str) -> str:
    """Enqueue as the web tier does, through the one owner of the outbox (`jobs.enqueue`).
    Imported here: only a sandbox wired to a database needs the job system (and its broker)."""


    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        if schema:
            conn.execute("SELECT set_config('search_path', %s, false)", (schema,))
        with conn.transaction():
            outbox_id = jobs.enqueue("kyc.sumsub_webhook", payload, idempotency_key=idem, conn=conn)
    return "inserted" if outbox_id is not None else "duplicate"


# --- admin API ---------------------------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json()
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="JSON object expected")
    return data


def _config_fields(data: dict[str, Any]) -> dict[str, Any]:
    known = set(Config.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown config fields: {sorted(unknown)}")
    return data


async def admin_health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def admin_reset(request: web.Request) -> web.Response:
    _state(request).reset(**_config_fields(await _body(request)))
    return web.json_response({"ok": True})


async def admin_config(request: web.Request) -> web.Response:
    state = _state(request)
    if request.method == "POST":
        data = _config_fields(await _body(request))
        for name, value in data.items():
            setattr(state.config, name, value)
        if "seed" in data:
            state.rng = random.Random(state.config.seed)
    view = asdict(state.config)
    for secret_field in ("client_secret", "sumsub_app_token", "sumsub_secret_key", "webhook_secret",
                         "database_url", "admin_token"):
        view[secret_field] = "***" if view[secret_field] else None
    return web.json_response(view)


async def admin_faults(request: web.Request) -> web.Response:
    state = _state(request)
    if request.method == "DELETE":
        state.faults.clear()
    elif request.method == "POST":
        data = await request.json()
        added = []
        for item in data if isinstance(data, list) else [data]:
            try:
                fault = Fault(**{k: v for k, v in item.items() if k not in ("id", "hits")})
            except TypeError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
            state.fault_ids += 1
            fault.id = state.fault_ids
            state.faults.append(fault)
            added.append(fault.id)
        return web.json_response({"ids": added})
    return web.json_response([asdict(f) for f in state.faults])


async def admin_requests(request: web.Request) -> web.Response:
    state = _state(request)
    if request.method == "DELETE":
        state.requests.clear()
        state.counts.clear()
        return web.json_response({"ok": True})
    pattern = request.query.get("op", "*")
    matched = [r for r in state.requests if fnmatch.fnmatchcase(r["op"], pattern)]
    counts = {op: n for op, n in state.counts.items() if fnmatch.fnmatchcase(op, pattern)}
    return web.json_response({"count": sum(counts.values()), "counts": counts, "requests": matched})


async def admin_account(request: web.Request) -> web.Response:
    state = _state(request)
    account = _account(state, request.match_info["account_id"])
    data = await _body(request)
    for name in ("amount", "currency", "consent", "consent_id", "raw_balances"):
        if name in data:
            account[name] = data[name]
    return web.json_response(account)


async def admin_expire_consent(request: web.Request) -> web.Response:
    data = await _body(request)
    account = _account(_state(request), request.match_info["account_id"])
    account["consent"] = "invalid" if data.get("code") == "CONSENT_INVALID" else "expired"
    return web.json_response(account)


async def admin_revoke_tokens(request: web.Request) -> web.Response:
    state = _state(request)
    revoked = len(state.tokens)
    state.tokens.clear()
    return web.json_response({"revoked": revoked})


async def admin_payment(request: web.Request) -> web.Response:
    state = _state(request)
    payment = state.payments.get(request.match_info["payment_id"])
    if payment is None:
        raise web.HTTPNotFound(text="unknown payment")
    if request.method == "POST":
        data = await _body(request)
        if "status" in data:
            payment["pinned"] = data["status"]
        if "script" in data:
            payment.update(script=list(data["script"]), index=0, pinned=None)
    return web.json_response({**payment, "transactionStatus": _payment_status(payment)})


async def admin_create_applicant(request: web.Request) -> web.Response:
    data = await _body(request)
    state = _state(request)
    applicant = _new_applicant(state, data["external_user_id"], data.get("level_name", "basic-kyc-level"),
                               data.get("applicant_id"))
    if data.get("decision"):
        applicant["decision"] = data["decision"]
    return web.json_response(_applicant_view(applicant), status=201)


async def admin_review(request: web.Request) -> web.Response:
    """Decide an applicant now (or after delay_s): {answer, reject_type, labels, delay_s}."""
    state = _state(request)
    applicant = state.applicants.get(request.match_info["applicant_id"])
    if applicant is None:
        raise web.HTTPNotFound(text="unknown applicant")
    data = await _body(request)
    delay = float(data.get("delay_s", 0))
    if delay > 0:
        state.spawn(_review_later(state, applicant["id"], delay, data))
        return web.json_response({"scheduled_in_s": delay})
    return web.json_response(await decide(state, applicant, data))


async def admin_emit_webhook(request: web.Request) -> web.Response:
    """Emit any webhook: {event: {...}} or {raw_body: "..."}, plus alg, forge, idempotency_key."""
    state = _state(request)
    data = await _body(request)
    kw = {k: data[k] for k in ("alg", "forge", "idempotency_key") if k in data}
    if "raw_body" in data:
        return web.json_response(await emit_webhook(state, data["raw_body"], **kw))
    event = dict(data.get("event") or {})
    applicant = state.applicants.get(event.get("applicantId", ""))
    if applicant is None:
        applicant = {"id": event.get("applicantId") or secrets.token_hex(12),
                     "inspectionId": secrets.token_hex(12), "externalUserId": event.get("externalUserId", ""),
                     "levelName": "basic-kyc-level", "review": {"reviewStatus": "completed"}}
    return web.json_response(await emit_event(state, applicant, event.get("type", "applicantReviewed"),
                                              extra=event, **kw))


async def admin_webhooks(request: web.Request) -> web.Response:
    return web.json_response(_state(request).webhooks)


# --- application -------------------------------------------------------------------------------


def create_app(config: Config | None = None) -> web.Application:
    app = web.Application(middlewares=[provider_middleware])
    app[STATE_KEY] = State(config or Config())
    r = app.router
    r.add_post("/auth/token", token, name="neonomics.token")
    r.add_get("/v1/accounts/{account_id}/balances", balances, name="neonomics.balances")
    r.add_post("/v1/payments/sepa-credit-transfers", initiate, name="neonomics.initiate")
    r.add_get("/v1/payments/{payment_id}/status", payment_status, name="neonomics.status")
    r.add_delete("/v1/payments/sepa-credit-transfers/{payment_id}", cancel, name="neonomics.cancel")
    r.add_get("/sca/{payment_id}", sca_page, name="bank.sca")
    r.add_post("/resources/applicants", create_applicant, name="sumsub.create_applicant")
    r.add_get("/resources/applicants/-;externalUserId={external_id}/one", get_applicant,
              name="sumsub.get_applicant")
    r.add_get("/resources/applicants/{applicant_id}/status", applicant_status, name="sumsub.status")
    r.add_post("/resources/applicants/{applicant_id}/status/pending", submit, name="sumsub.submit")

    r.add_get("/_admin/health", admin_health)
    r.add_post("/_admin/reset", admin_reset)
    r.add_route("*", "/_admin/config", admin_config)
    r.add_route("*", "/_admin/faults", admin_faults)
    r.add_route("*", "/_admin/requests", admin_requests)
    r.add_post("/_admin/accounts/{account_id}", admin_account)
    r.add_post("/_admin/accounts/{account_id}/expire-consent", admin_expire_consent)
    r.add_post("/_admin/tokens/revoke", admin_revoke_tokens)
    r.add_route("*", "/_admin/payments/{payment_id}", admin_payment)
    r.add_post("/_admin/sumsub/applicants", admin_create_applicant)
    r.add_post("/_admin/sumsub/applicants/{applicant_id}/review", admin_review)
    r.add_post("/_admin/sumsub/webhooks", admin_emit_webhook)
    r.add_get("/_admin/webhooks", admin_webhooks)
    return app


def config_from_settings() -> Config:
    """Accept the same credentials the worker is configured with (when set)."""

    s = get_settings()
    secret = s.sumsub_webhook_secret
    return Config(
        client_id=s.neonomics_client_id,
        client_secret=s.neonomics_client_secret.get_secret_value() if s.neonomics_client_secret else None,
        sumsub_app_token=s.sumsub_app_token.get_secret_value() if s.sumsub_app_token else None,
        sumsub_secret_key=s.sumsub_secret_key.get_secret_value() if s.sumsub_secret_key else None,
        webhook_secret=secret.get_secret_value() if secret else None,
        database_url=s.database_url,
        admin_token=s.sandbox_admin_token.get_secret_value() if s.sandbox_admin_token else None,
    )


class SandboxRefused(RuntimeError):
    """The sandbox will not run here; the message says why in one line."""


def refuse_unless_safe(drop_env: str, host: str) -> None:
    """The sandbox accepts any caller's credentials and signs webhooks with the real secret: it
    runs only in development and only on a loopback address."""

    if drop_env != "development":
        raise SandboxRefused(f"the sandbox runs only with DROP_ENV=development (it is {drop_env})")
    if not is_loopback(host):
        raise SandboxRefused("the sandbox binds loopback addresses only (--host / DROP_SANDBOX_HOST)")


def admin_token_file(data_dir: Path, port: int) -> Path:
    """Where a sandbox on `port` leaves its admin token for local clients (mode 0600)."""
    return data_dir / f"sandbox-admin-token-{port}"


async def serve(host: str, port: int, config: Config | None = None, *, ready=None) -> None:
    """Run until cancelled. `ready(url)` is called once the socket is listening."""

    settings = get_settings()
    refuse_unless_safe(settings.drop_env, host)
    config = config or Config()
    if not config.admin_token:
        config.admin_token = secrets.token_urlsafe(24)
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    url = f"http://{host}:{bound[1]}"
    token_file = admin_token_file(settings.data_dir.resolve(), bound[1])
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(config.admin_token or "")
    if ready is not None:
        ready(url)
    try:
        await asyncio.Event().wait()
    finally:
        token_file.unlink(missing_ok=True)
        await runner.cleanup()
