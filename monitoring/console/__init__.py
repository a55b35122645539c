"""The operations console: server-rendered pages under /console in the monitor process.

Off (every /console path answers 404) unless DROP_CONSOLE_USERS names users. Pages are Jinja2
templates (autoescaped); the only script is static/console.js (auto-refresh and "select all"),
so the Content-Security-Policy allows no inline script. Viewers see every page; operators may
also replay and purge dead letters — POSTs carrying the session's CSRF token, each recorded in
audit_log by worker.dlq in the transaction of the change. See docs/console.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web

from db import audit
from db.audit import Audit
from db.pool import transaction
from monitoring.console import auth, pages
from monitoring.status import fmt_age, oslo
from worker import dlq
from worker.settings import get_settings

# The monitor's small pool for blocking calls (monitoring.server creates it; the console's
# handlers run their PostgreSQL/Redis work there too).
HANDLER_POOL: web.AppKey[ThreadPoolExecutor] = web.AppKey("handler_pool", ThreadPoolExecutor)

log = logging.getLogger("monitor.console")

HERE = Path(__file__).resolve().parent
COOKIE = "drop_console"
REFRESH_S = 10  # how often console.js reloads a page's live part (filters kept: it reloads the same URL)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer the browser sends "Origin: null" on our own
    # form posts, and the Origin check below could no longer tell them from a cross-site post.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NAV = [("/console/", "Overview"), ("/console/jobs", "Jobs"), ("/console/dead-letters", "Dead letters"),
       ("/console/breakers", "Breakers"), ("/console/scheduler", "Scheduler"), ("/console/psd2", "PSD2")]
NOTICES = {"replayed": "Replayed {n} dead letter(s): their jobs run again.",
           "purged": "Purged {n} dead letter(s).",
           "nothing": "Nothing selected: tick dead letters first, or use “all matching”."}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SESSION = web.RequestKey("session", auth.Session)


def _url(base: str, query: Mapping[str, str], **changes: Any) -> str:
    """This page's URL with some parameters changed (paging keeps the filters)."""
    params = {k: v for k, v in query.items() if k not in ("done", "n")}
    params.update({k: str(v) for k, v in changes.items() if v is not None})
    params = {k: v for k, v in params.items() if v != ""}
    return f"{base}?{urlencode(params)}" if params else base


_templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined)
_templates.filters.update(oslo=oslo, age=fmt_age)
_templates.globals.update(url=_url, nav=NAV, refresh_s=REFRESH_S)


async def _blocking(request: web.Request, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(request.config_dict[HANDLER_POOL],
                                                            partial(fn, *args, **kwargs))


def _render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    session = request.get(SESSION)
    body = _templates.get_template(template).render(
        user=session.user if session else None, csrf=session.csrf if session else "",
        path=request.path, query=dict(request.query), notice=_notice(request.query), **context)
    return web.Response(status=status, text=body, content_type="text/html")


def _notice(query: Mapping[str, str]) -> str | None:
    text = NOTICES.get(query.get("done", ""))
    return text.format(n=int(query["n"]) if query.get("n", "").isdigit() else 0) if text else None


# --- middleware: headers, sessions, CSRF, roles ----------------------------------------------

PUBLIC = ("/console/login", "/console/logout", "/console/static/")


@web.middleware
async def _security(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as error:
        response = error
    response.headers.update(SECURITY_HEADERS)
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def _session(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "POST":
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text="403: cross-site request refused")
    if request.path.startswith(PUBLIC):
        return await handler(request)
    session = await _blocking(request, auth.load_session, request.cookies.get(COOKIE))
    if session is None:
        if request.method == "POST":
            raise web.HTTPForbidden(text="403: log in first")
        raise web.HTTPSeeOther("/console/login?" + urlencode({"next": request.path_qs}))
    request[SESSION] = session
    if request.method == "POST":
        form = await request.post()
        if not auth.csrf_ok(session, str(form.get("csrf_token") or "")):
            raise web.HTTPForbidden(text="403: missing or wrong CSRF token (reload the page)")
        if not session.user.may_act:
            raise web.HTTPForbidden(text="403: viewers cannot change anything")
    return await handler(request)


# --- login ---------------------------------------------------------------------------------


def _next_path(value: str | None) -> str:
    # Only a path of this console: never an open redirect to another site.
    return value if value and value.startswith("/console/") and not value.startswith("//") else "/console/"


async def login_form(request: web.Request) -> web.Response:
    return _render(request, "login.html", next=_next_path(request.query.get("next")), error=None)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    name, password = str(form.get("username") or "")[:64], str(form.get("password") or "")[:1024]
    target = _next_path(str(form.get("next") or ""))
    address = request.remote or "?"
    wait = await _blocking(request, auth.login_blocked_for, name, address)
    if wait:
        return _render(request, "login.html", status=429, next=target,
                       error=f"Too many failed logins: try again in {fmt_age(wait)}.")
    user = await _blocking(request, auth.authenticate, name, password)
    if user is None:
        await _blocking(request, auth.login_failed, name, address)
        return _render(request, "login.html", status=401, next=target, error="Wrong name or password.")
    session = await _blocking(request, auth.start_session, user)
    await _blocking(request, _audit, "console.login", {"operator": user.name, "role": user.role})
    response = web.HTTPSeeOther(target)
    response.set_cookie(COOKIE, session.token, httponly=True, samesite="Strict", path="/console",
                        secure=get_settings().drop_env != "development")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    await _blocking(request, auth.end_session, request.cookies.get(COOKIE))
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(COOKIE, path="/console")
    return response


def _audit(action: str, details: dict[str, Any]) -> None:
    with transaction() as conn:
        audit.record(conn, action, details)


# --- pages ---------------------------------------------------------------------------------


def _page(template: str, gather: Callable[[web.Request], Callable[[], Any]]) -> Handler:
    """A GET page: gather its data on a handler thread, render it; a bad filter is shown, not raised."""

    async def handler(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            data = await _blocking(request, gather(request))
        except pages.BadFilter as error:
            return _render(request, template, status=400, data=None, bad_filter=str(error))
        if data is None:
            raise web.HTTPNotFound(text="404: no such row (pruned, purged or never there)")
        response = _render(request, template, data=data, bad_filter=None)
        response.headers["Server-Timing"] = f"gather;dur={(time.perf_counter() - started) * 1000:.1f}"
        return response

    return handler


def _id(request: web.Request) -> int:
    value = request.match_info["id"]
    if not value.isdigit() or len(value) > 18:
        raise web.HTTPNotFound()
    return int(value)


def _jobs(request: web.Request) -> Callable[[], Any]:
    f = pages.JobFilter.from_query(request.query)
    return lambda: pages.jobs_page(f)


def _dead_letters(request: web.Request) -> Callable[[], Any]:
    f = pages.DeadLetterFilter.from_query(request.query)
    return lambda: pages.dead_letters_page(f)


def _psd2(request: web.Request) -> Callable[[], Any]:
    account = pages._text(request.query, "account", 200)
    return lambda: pages.psd2_page(account)


# --- actions (operators; CSRF and role checked by _session) ------------------------------------


def _selection(form: Mapping[str, Any]) -> tuple[list[int] | None, pages.DeadLetterFilter]:
    """The ticked ids, or None for "all matching the filter"; and the filter the form carried."""
    f = pages.DeadLetterFilter.from_query({"job": str(form.get("job") or ""), "reason": str(form.get("reason") or "")})
    if form.get("all") == "1":
        return None, f
    ids = [int(v) for v in form.getall("id", []) if str(v).isdigit()]  # type: ignore[attr-defined]
    return ids, f


def _back(form: Mapping[str, Any], done: str, n: int) -> web.HTTPSeeOther:
    back = _next_path(str(form.get("back") or "/console/dead-letters"))
    if done == "purged" and back.startswith("/console/dead-letters/"):
        back = "/console/dead-letters"  # the detail page of a purged dead letter is gone
    sep = "&" if "?" in back else "?"
    return web.HTTPSeeOther(f"{back}{sep}{urlencode({'done': done, 'n': n})}")


def _action_audit(request: web.Request, action: str, ids: list[int] | None, f: pages.DeadLetterFilter) -> Audit:
    details: dict[str, Any] = {"operator": request[SESSION].user.name}
    if ids is None:
        details["filter"] = {"job": f.job, "reason": f.reason}  # checked free of personal data
    return Audit(action, details)


async def _selected(request: web.Request) -> tuple[Mapping[str, Any], list[int] | None, pages.DeadLetterFilter]:
    form = await request.post()
    try:
        ids, f = _selection(form)
    except pages.BadFilter as error:
        raise web.HTTPBadRequest(text=f"400: {error}") from None
    if ids == []:
        raise _back(form, "nothing", 0)
    return form, ids, f


async def _apply(request: web.Request, operation: Callable[..., int], action: str, ids: list[int] | None,
                 f: pages.DeadLetterFilter) -> int:
    """worker.dlq's replay or purge — what `drop-jobs dlq` calls — with the console's audit row."""
    count: int = await _blocking(request, operation, ids, job=f.job if ids is None else None,
                                 reason=f.reason if ids is None else None,
                                 audit=_action_audit(request, action, ids, f))
    log.info("console: %s: %s, %d dead letter(s)", request[SESSION].user.name, action, count)
    return count


async def replay(request: web.Request) -> web.StreamResponse:
    form, ids, f = await _selected(request)
    raise _back(form, "replayed", await _apply(request, dlq.replay, "console.dlq.replay", ids, f))


async def purge(request: web.Request) -> web.StreamResponse:
    form, ids, f = await _selected(request)
    if form.get("confirm") != "yes":
        matching = len(ids) if ids is not None else await _blocking(request, dlq.count_dead_letters,
                                                                     job=f.job, reason=f.reason)
        return _render(request, "purge_confirm.html", ids=ids or [], all_matching=ids is None, filter=f,
                       matching=matching, back=_next_path(str(form.get("back") or "")))
    raise _back(form, "purged", await _apply(request, dlq.purge, "console.dlq.purge", ids, f))


async def _not_found(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


def console_app() -> web.Application:
    app = web.Application(middlewares=[_security, _session])
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_static("/static", HERE / "static", append_version=False)
    app.router.add_get("/", _page("overview.html", lambda r: pages.overview))
    app.router.add_get("/jobs", _page("jobs.html", _jobs))
    app.router.add_get("/jobs/{id}", _page("job.html", lambda r: partial(pages.job_detail, _id(r))))
    app.router.add_get("/dead-letters", _page("dead_letters.html", _dead_letters))
    app.router.add_get("/dead-letters/{id}",
                       _page("dead_letter.html", lambda r: partial(pages.dead_letter_detail, _id(r))))
    app.router.add_post("/dead-letters/replay", replay)
    app.router.add_post("/dead-letters/purge", purge)
    app.router.add_get("/breakers", _page("breakers.html", lambda r: pages.breakers_page))
    app.router.add_get("/scheduler", _page("scheduler.html", lambda r: pages.scheduler_page))
    app.router.add_get("/psd2", _page("psd2.html", _psd2))
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


def install(app: web.Application) -> bool:
    """Mount the console on the monitor's application when DROP_CONSOLE_USERS names users;
    otherwise add nothing (the monitor's catch-all answers 404 under /console)."""
    if not get_settings().console_users:
        return False

    async def to_console(request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/console/")

    app.router.add_get("/console", to_console)
    app.add_subapp("/console", console_app())
    return True
