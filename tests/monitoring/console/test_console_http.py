"""The console over plain HTTP (the monitor's real server, in this process): off unless configured,
login and its limits, cookie flags, sessions, CSRF and roles, headers, no personal data."""

from __future__ import annotations

import httpx
import pytest

from .conftest import PASSWORDS, PERSON, csrf_of, log_in


def viewer_csrf(cookie: str) -> str:
    import hashlib
    import json

    from worker.redis_client import get_redis, key

    return json.loads(get_redis().get(key("console", "session", hashlib.sha256(cookie.encode()).hexdigest())))["csrf"]


PAGES = ["/console/", "/console/jobs", "/console/dead-letters", "/console/breakers", "/console/scheduler",
         "/console/psd2"]


def test_the_console_is_404_everywhere_when_no_users_are_configured(db, monkeypatch):
    from monitoring.server import serve
    from worker.settings import get_settings

    monkeypatch.delenv("DROP_CONSOLE_USERS", raising=False)
    get_settings.cache_clear()
    server = serve("127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for path in ["/console", "/console/", "/console/login", "/console/static/console.js", *PAGES]:
            assert httpx.get(base + path).status_code == 404, path
        assert httpx.post(base + "/console/login", data={"username": "otto", "password": "x"}).status_code == 404
        assert httpx.get(base + "/v1/health").status_code in (200, 503)  # the monitor itself still answers
    finally:
        server.shutdown()


def test_every_page_asks_for_a_login_first(console):
    for path in PAGES:
        response = httpx.get(console + path)
        assert response.status_code == 303 and response.headers["location"].startswith("/console/login?next="), path
    login = httpx.get(console + "/console/login")
    assert 'name="username"' in login.text and 'name="password"' in login.text


def test_a_wrong_password_is_refused_and_a_right_one_gives_a_strict_httponly_cookie(console):
    refused = httpx.post(console + "/console/login", data={"username": "vera", "password": "nope"})
    assert refused.status_code == 401 and "Wrong name or password" in refused.text
    assert "set-cookie" not in refused.headers
    unknown = httpx.post(console + "/console/login", data={"username": "nobody", "password": "nope"})
    assert unknown.status_code == 401 and "Wrong name or password" in unknown.text  # the same answer
    ok = httpx.post(console + "/console/login", data={"username": "vera", "password": PASSWORDS["vera"]})
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert "secure" not in cookie  # development serves plain http on loopback


def test_the_cookie_is_secure_outside_development(db, monkeypatch, console_users):
    from monitoring.server import serve
    from worker.settings import get_settings

    monkeypatch.setenv("DROP_ENV", "staging")
    monkeypatch.setenv("DROP_CONSOLE_USERS", console_users)
    get_settings.cache_clear()
    server = serve("127.0.0.1", 0)
    try:
        response = httpx.post(f"http://127.0.0.1:{server.server_address[1]}/console/login",
                              data={"username": "vera", "password": PASSWORDS["vera"]})
        assert response.status_code == 303 and "; secure" in response.headers["set-cookie"].lower()
    finally:
        server.shutdown()


def test_failed_logins_are_limited_even_for_the_right_password_afterwards(console):
    from monitoring.console.auth import FAILED_LOGINS_PER_NAME

    for _ in range(FAILED_LOGINS_PER_NAME):
        assert httpx.post(console + "/console/login", data={"username": "otto", "password": "guess"}).status_code == 401
    blocked = httpx.post(console + "/console/login", data={"username": "otto", "password": PASSWORDS["otto"]})
    assert blocked.status_code == 429 and "Too many failed logins" in blocked.text
    assert "set-cookie" not in blocked.headers
    # another user is not locked out by otto's failures
    assert httpx.post(console + "/console/login",
                      data={"username": "vera", "password": PASSWORDS["vera"]}).status_code == 303


def test_logout_ends_the_session_on_the_server(console):
    client = log_in(console, "vera")
    token = client.cookies["drop_console"]
    assert client.get("/console/").status_code == 200
    assert client.post("/console/logout").status_code == 303
    replayed = httpx.get(console + "/console/", cookies={"drop_console": token})  # the old cookie, kept by an attacker
    assert replayed.status_code == 303 and "/console/login" in replayed.headers["location"]


def test_a_session_expires_when_its_redis_entry_does(console):
    from worker.redis_client import get_redis, key

    client = log_in(console, "vera")
    for k in get_redis().scan_iter(match=key("console", "session", "*")):
        assert 0 < get_redis().ttl(k) <= 1800  # DROP_CONSOLE_SESSION_IDLE_S
        get_redis().delete(k)  # as if the idle time had passed
    assert client.get("/console/").status_code == 303


def test_security_headers_on_every_console_answer(console):
    client = log_in(console, "vera")
    for response in [client.get(p) for p in PAGES] + [httpx.get(console + "/console/login"),
                                                       client.get("/console/nowhere"),
                                                       client.get("/console/static/console.js")]:
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
    overview = client.get("/console/").text
    assert "<script>" not in overview and "<script src=\"/console/static/console.js\"" in overview


@pytest.mark.parametrize("with_token", [False, True])
def test_a_viewer_sees_no_action_and_a_forged_action_is_403(console, seed_dead_letter, sql, with_token):
    dead = seed_dead_letter()
    viewer = log_in(console, "vera")
    page = viewer.get("/console/dead-letters").text
    assert f"/console/dead-letters/{dead['id']}" in page
    assert "Replay" not in page and "Purge" not in page and "csrf_token" not in page
    detail = viewer.get(f"/console/dead-letters/{dead['id']}").text
    assert "Replay" not in detail
    # With the viewer session's own valid CSRF token (read from its Redis entry), the role refuses it.
    token = viewer_csrf(viewer.cookies["drop_console"]) if with_token else ""
    for action in ("replay", "purge"):
        forged = viewer.post(f"/console/dead-letters/{action}",
                             data={"id": str(dead["id"]), "confirm": "yes", "csrf_token": token})
        assert forged.status_code == 403, action
        assert ("viewers cannot change anything" if with_token else "CSRF token") in forged.text
    assert sql("SELECT replayed_at FROM dead_letters WHERE id = %s", (dead["id"],))[0]["replayed_at"] is None
    assert sql("SELECT count(*) AS n FROM audit_log WHERE action LIKE 'console.dlq.%%'")[0]["n"] == 0


def test_an_operator_action_without_the_csrf_token_is_403(console, seed_dead_letter, sql):
    dead = seed_dead_letter()
    operator = log_in(console, "otto")
    assert operator.post("/console/dead-letters/replay", data={"id": str(dead["id"])}).status_code == 403
    assert operator.post("/console/dead-letters/replay",
                         data={"id": str(dead["id"]), "csrf_token": "not-the-token"}).status_code == 403
    token = csrf_of(operator.get("/console/dead-letters").text)
    cross_site = operator.post("/console/dead-letters/replay", headers={"Origin": "https://evil.example"},
                               data={"id": str(dead["id"]), "csrf_token": token})
    assert cross_site.status_code == 403
    assert sql("SELECT replayed_at FROM dead_letters WHERE id = %s", (dead["id"],))[0]["replayed_at"] is None


def test_an_operator_replays_one_dead_letter_and_the_audit_log_names_them(console, seed_dead_letter, sql):
    dead, other = seed_dead_letter(), seed_dead_letter()
    operator = log_in(console, "otto")
    token = csrf_of(operator.get(f"/console/dead-letters/{dead['id']}").text)
    done = operator.post("/console/dead-letters/replay", data={"id": str(dead["id"]), "csrf_token": token,
                                                               "back": f"/console/dead-letters/{dead['id']}"})
    assert done.status_code == 303
    page = operator.get(done.headers["location"]).text
    assert "Replayed 1 dead letter(s)" in page and "replayed" in page
    row = sql("SELECT error, relayed_at FROM job_outbox WHERE id = %s", (dead["outbox_id"],))[0]
    assert row["error"] is None and row["relayed_at"] is None  # reopened: the relay sends it again
    assert sql("SELECT replayed_at FROM dead_letters WHERE id = %s", (other["id"],))[0]["replayed_at"] is None
    audit = sql("SELECT user_id, action, details FROM audit_log WHERE action LIKE 'console.dlq.%%'")
    assert audit == [{"user_id": None, "action": "console.dlq.replay",
                      "details": {"operator": "otto", "count": 1, "dead_letter_ids": [dead["id"]],
                                  "outbox_ids": [dead["outbox_id"]]}}]


def test_replay_all_matching_a_filter_touches_only_those(console, seed_dead_letter, sql):
    matching = [seed_dead_letter(reason="HTTPStatusError: 503 from sumsub") for _ in range(3)]
    other = seed_dead_letter(reason="UnknownApplicant: no user")
    operator = log_in(console, "otto")
    page = operator.get("/console/dead-letters", params={"reason": "503"}).text
    assert '<strong id="matching">3</strong>' in page
    done = operator.post("/console/dead-letters/replay", data={"all": "1", "reason": "503", "job": "",
                                                               "csrf_token": csrf_of(page)})
    assert done.status_code == 303 and "n=3" in done.headers["location"]
    replayed = {r["id"] for r in sql("SELECT id FROM dead_letters WHERE replayed_at IS NOT NULL")}
    assert replayed == {d["id"] for d in matching} and other["id"] not in replayed
    details = sql("SELECT details FROM audit_log WHERE action = 'console.dlq.replay'")[0]["details"]
    assert details["filter"] == {"job": None, "reason": "503"} and sorted(details["dead_letter_ids"]) == sorted(
        d["id"] for d in matching)


def test_purge_asks_for_confirmation_first(console, seed_dead_letter, sql):
    dead = seed_dead_letter()
    operator = log_in(console, "otto")
    token = csrf_of(operator.get("/console/dead-letters").text)
    asked = operator.post("/console/dead-letters/purge", data={"id": str(dead["id"]), "csrf_token": token})
    assert asked.status_code == 200 and "Purge 1 dead letter(s) for good?" in asked.text
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 1
    purged = operator.post("/console/dead-letters/purge", data={"id": str(dead["id"]), "csrf_token": token,
                                                                "confirm": "yes"})
    assert purged.status_code == 303
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0
    assert sql("SELECT details FROM audit_log WHERE action = 'console.dlq.purge'")[0]["details"]["dead_letter_ids"] \
        == [dead["id"]]


def test_no_page_shows_seeded_personal_data(console, seed_dead_letter, sql):
    # A payload full of personal data and an old, unscrubbed reason quoting it.
    dead = seed_dead_letter(job="kyc.sumsub_webhook", queue="kyc", payload={"body": str(PERSON), **PERSON},
                            reason=f"ValueError: no user for {PERSON['email']} {PERSON['national_id']} "
                                   f"{PERSON['iban']} first_name={PERSON['name']}")
    operator = log_in(console, "otto")
    bodies = [operator.get(p).text for p in [
        *PAGES, f"/console/dead-letters/{dead['id']}", f"/console/jobs/{dead['outbox_id']}",
        "/console/jobs?job=kyc.sumsub_webhook", "/console/dead-letters?job=kyc.sumsub_webhook"]]
    for body in bodies:
        for value in [*PERSON.values(), "Kari", "Nordmann"]:
            assert value not in body
    detail = bodies[len(PAGES)]
    assert "<code>email</code>" in detail and "<code>national_id</code>" in detail  # keys, never values
    # searching for personal data is refused, not answered with a match count
    probe = operator.get("/console/dead-letters", params={"reason": PERSON["national_id"]})
    assert probe.status_code == 400 and "looks like personal data" in probe.text and "matching" not in probe.text


def test_jobs_search_filters_and_pages_by_keyset(console, sql):
    sql("""INSERT INTO job_outbox (job, payload, idempotency_key, done_at)
           SELECT CASE WHEN g % 2 = 0 THEN 'housekeeping.prune' ELSE 'pisp.sweep' END, '{}',
                  'search-' || g, CASE WHEN g % 3 = 0 THEN now() END
             FROM generate_series(1, 130) g""")
    client = log_in(console, "vera")
    first = client.get("/console/jobs", params={"job": "housekeeping.prune", "state": "done"})
    assert first.status_code == 200
    rows = first.text.count('class="state-done"')
    assert rows == 21  # g even and a multiple of 3, up to 130
    page = client.get("/console/jobs", params={"key_prefix": "search-1"})
    assert page.text.count("search-1") >= 40 and "search-2" not in page.text
    everything = client.get("/console/jobs").text
    assert 'rel="next"' in everything
    older = client.get("/console/jobs?before=50").text
    assert "/console/jobs/49\"" in older and "/console/jobs/50\"" not in older
    assert client.get("/console/jobs", params={"state": "bogus"}).status_code == 400
