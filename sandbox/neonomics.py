"""The Neonomics (Berlin Group) side of the sandbox: token, balances, payment initiation,
status, cancel and the SCA page."""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from typing import Any

from aiohttp import web

from sandbox.state import AMOUNT, DEFAULT_BALANCE, FINAL_STATUSES, State, bg_error, now_iso, state_of

# --- Neonomics -------------------------------------------------------------------------------


def _bearer_ok(request: web.Request) -> bool:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        return False
    expiry = state_of(request).tokens.get(auth[7:])
    return expiry is not None and expiry > time.time()


async def token(request: web.Request) -> web.Response:
    state = state_of(request)
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


def account_of(state: State, account_id: str) -> dict[str, Any]:
    return state.accounts.setdefault(
        account_id,
        {"amount": DEFAULT_BALANCE, "currency": "NOK", "consent": "valid", "consent_id": None,
         "raw_balances": None},
    )


async def balances(request: web.Request) -> web.Response:
    if not _bearer_ok(request):
        return bg_error(401, "TOKEN_INVALID")
    state = state_of(request)
    consent_id = request.headers.get("X-Consent-ID")
    if not consent_id:
        return bg_error(400, "FORMAT_ERROR", "X-Consent-ID missing")
    account = account_of(state, request.match_info["account_id"])
    if account["consent"] == "expired":
        return bg_error(403, "CONSENT_EXPIRED")  # docs/providers.md: 403
    if account["consent"] == "invalid":
        return bg_error(401, "CONSENT_INVALID")
    if account["consent_id"] and account["consent_id"] != consent_id:
        return bg_error(403, "CONSENT_UNKNOWN")
    if account["raw_balances"] is not None:
        return web.json_response({"balances": account["raw_balances"]})
    amount = {"currency": account["currency"], "amount": account["amount"]}
    now = now_iso()
    return web.json_response({"balances": [
        {"balanceType": "closingBooked", "balanceAmount": amount, "lastChangeDateTime": now},
        {"balanceType": "expected", "balanceAmount": amount, "lastChangeDateTime": now},
    ]})


async def initiate(request: web.Request) -> web.Response:
    if not _bearer_ok(request):
        return bg_error(401, "TOKEN_INVALID")
    state = state_of(request)
    request_id = request.headers.get("X-Request-ID")
    if not request_id or not request.headers.get("X-Consent-ID"):
        return bg_error(400, "FORMAT_ERROR", "X-Request-ID and X-Consent-ID are required")
    existing = state.payments_by_request_id.get(request_id)
    if existing is None:
        try:
            body = await request.json()
            amount = body["instructedAmount"]["amount"]
            if not isinstance(amount, str) or not AMOUNT.fullmatch(amount) or float(amount) <= 0:
                raise ValueError
            body["creditorAccount"]
        except (ValueError, KeyError, TypeError):
            return bg_error(400, "FORMAT_ERROR", "bad payment body")
        existing = "pay_" + secrets.token_hex(8)
        state.payments[existing] = {"script": list(state.config.payment_script), "index": 0,
                                    "pinned": None, "request_id": request_id, "amount": amount}
        state.payments_by_request_id[request_id] = existing
    payment = state.payments[existing]
    return web.json_response(
        {"paymentId": existing, "transactionStatus": scripted_status(payment),
         "_links": {"scaRedirect": {"href": f"{request.url.origin()}/sca/{existing}"}}},
        status=201,
    )


def scripted_status(payment: dict[str, Any]) -> str:
    return payment["pinned"] or payment["script"][min(payment["index"], len(payment["script"]) - 1)]


async def payment_status(request: web.Request) -> web.Response:
    if not _bearer_ok(request):
        return bg_error(401, "TOKEN_INVALID")
    payment = state_of(request).payments.get(request.match_info["payment_id"])
    if payment is None:
        return bg_error(404, "RESOURCE_UNKNOWN")
    if payment["pinned"] is None and payment["index"] < len(payment["script"]) - 1:
        payment["index"] += 1  # each poll moves the payment one step along its script
    return web.json_response({"transactionStatus": scripted_status(payment)})


async def cancel(request: web.Request) -> web.Response:
    if not _bearer_ok(request):
        return bg_error(401, "TOKEN_INVALID")
    payment = state_of(request).payments.get(request.match_info["payment_id"])
    if payment is None:
        return bg_error(404, "RESOURCE_UNKNOWN")
    if scripted_status(payment) in FINAL_STATUSES:
        return bg_error(400, "CANCELLATION_INVALID")
    payment["pinned"] = "CANC"
    return web.Response(status=204)


async def sca_page(request: web.Request) -> web.Response:
    """A stand-in for the bank's SCA page: ?result=ok|fail settles the payment (dev tool)."""
    payment = state_of(request).payments.get(request.match_info["payment_id"])
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
