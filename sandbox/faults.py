"""The sandbox middleware: every provider request is recorded (never bodies) and counted, and
scripted faults (latency, a status, a hang, a dropped connection) are applied per operation."""

from __future__ import annotations

import asyncio
import hmac
import time

from aiohttp import web

from sandbox.state import Fault, bg_error, state_of, sumsub_error

# --- middleware: record, count, inject faults --------------------------------------------------


ADMIN_TOKEN_HEADER = "X-Sandbox-Admin-Token"  # noqa: S105 (a header name, not a secret)


@web.middleware
async def provider_middleware(request: web.Request, handler):
    if request.path.startswith("/_admin"):
        expected = state_of(request).config.admin_token
        given = request.headers.get(ADMIN_TOKEN_HEADER, "")
        if request.path != "/_admin/health" and (
                not expected or not hmac.compare_digest(given.encode(), expected.encode())):
            return web.json_response({"error": "admin token required"}, status=401)
        return await handler(request)
    state = state_of(request)
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
        return bg_error(504, "TIMEOUT", "sandbox hang")
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
        response = sumsub_error(fault.status, "sandbox fault", code)
    else:
        response = bg_error(fault.status, code, "sandbox fault")
    response.headers.update(headers)
    return response
