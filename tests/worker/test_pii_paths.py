"""Personal data seeded into every path a value can take out of the job system, and found in none.

Kinds: national id, name (after a personal field's name), IBAN, e-mail, phone (Norwegian and
E.164), IP address, bearer token. Paths: a log line, a traceback (through a plain
logging.Formatter, as Dramatiq's own handlers use), a stored dead-letter reason and
`job_outbox.error`, `drop-jobs dlq list/show`, Slack (a local receiver) and a Sentry envelope
(a local receiver).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import uuid

import dramatiq
import sentry_sdk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_for
from tests.monitoring.conftest import receiver, slack  # noqa: F401  (fixtures)
from tests.monitoring.test_sentry import events, sentry  # noqa: F401  (fixtures)
from worker.logs import ScrubbingFormatter, install_record_scrubber


def _n(k: int) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=k, max_size=k)


NAMES = st.sampled_from(["Kari", "Ola", "Ingrid", "Øyvind", "Åse"]).flatmap(
    lambda first: st.sampled_from(["Nordmann", "Hansen", "Berg"]).map(lambda last: f"{first} {last}"))

PII = st.one_of(
    _n(11).map(lambda d: ("national id", d, d)),
    NAMES.map(lambda n: ("name", f"first_name={n}", n)),
    NAMES.map(lambda n: ("name", f'"lastName": "{n}"', n)),
    _n(11).map(lambda d: ("iban", f"NO93{d}", f"NO93{d}")),
    st.from_regex(r"[a-z]{3,8}\.[a-z]{2,6}@[a-z]{3,8}\.(no|com)", fullmatch=True).map(lambda e: ("email", e, e)),
    _n(7).map(lambda d: ("phone", f"+47 9{d[:2]} {d[2:4]} {d[4:]}", f"9{d[:2]} {d[2:4]} {d[4:]}")),
    _n(7).map(lambda d: ("phone", f"9{d}", f"9{d}")),
    _n(9).map(lambda d: ("phone", f"+46{d}", f"+46{d}")),
    st.tuples(st.integers(11, 99), st.integers(0, 255), st.integers(0, 255), st.integers(1, 254)).map(
        lambda t: ("ip", ".".join(map(str, t)), ".".join(map(str, t)))),
    st.integers(1, 0xFFFF).map(lambda x: ("ip", f"2001:db8:85a3::{x:x}", f"2001:db8:85a3::{x:x}")),
    st.text("abcdefghijkmnopqrstuvwxyzABCDEFGH0123456789", min_size=20, max_size=40).map(
        lambda t: ("token", f"Authorization: Bearer {t}", t)),
)
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_absent(secret: str, text: str, where: str, kind: str) -> None:
    assert secret not in text, f"{kind} leaked through {where}"


@SETTINGS
@given(pii=PII)
def test_no_pii_in_log_lines_or_tracebacks(pii):
    kind, seeded, secret = pii
    install_record_scrubber()
    ours, theirs = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(ours), logging.StreamHandler(theirs)]
    handlers[0].setFormatter(ScrubbingFormatter("%(levelname)s %(name)s: %(message)s"))
    handlers[1].setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))  # Dramatiq's kind
    log = logging.getLogger(f"pii.{uuid.uuid4().hex}")
    log.propagate = False
    for h in handlers:
        log.addHandler(h)
    log.warning("lookup failed for %s", seeded)
    log.warning(f"lookup failed for {seeded}")  # a template that carries the value itself
    try:
        raise ValueError(f"bad input {seeded} in request")
    except ValueError as error:
        log.exception("job failed: %s", error)
    assert_absent(secret, ours.getvalue(), "our log handler", kind)
    # Dramatiq's handlers use a plain Formatter: records are scrubbed when created, tracebacks included.
    assert "Traceback" in theirs.getvalue()
    assert_absent(secret, theirs.getvalue(), "a plain handler (message or traceback)", kind)


@SETTINGS
@given(pii=PII)
def test_no_pii_in_dead_letter_reasons_or_the_cli(db, sql, pii):
    from monitoring.cli import main
    from worker.middleware import record_dead_letter

    kind, seeded, secret = pii
    outbox_id = sql("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES ('pisp.sweep', '{}', %s) "
                    "RETURNING id", (uuid.uuid4().hex,))[0]["id"]
    message = dramatiq.Message(queue_name="pisp", actor_name="pisp.sweep", args=(), kwargs={},
                               options={"outbox_id": outbox_id})
    record_dead_letter(message, ValueError(f"provider said {seeded} is invalid"))
    # An older row, stored before reasons were scrubbed, must not leak through the CLI either.
    sql("INSERT INTO dead_letters (message_id, job, queue_name, message, reason) VALUES (%s, 'pisp.sweep', "
        "'pisp', '{}', %s)", (uuid.uuid4().hex, f"ValueError: {seeded}"))
    [stored] = sql("SELECT reason FROM dead_letters WHERE message_id = %s", (message.message_id,))
    assert_absent(secret, stored["reason"], "dead_letters.reason", kind)
    assert_absent(secret, sql("SELECT error FROM job_outbox WHERE id = %s", (outbox_id,))[0]["error"],
                  "job_outbox.error", kind)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["dlq", "list", "--limit", "500"])
        for row in sql("SELECT id FROM dead_letters"):
            main(["dlq", "show", str(row["id"])])
    assert_absent(secret, out.getvalue(), "drop-jobs dlq list/show", kind)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(pii=PII)
def test_no_pii_in_slack_or_sentry(sentry, slack, pii):  # noqa: F811
    from worker.alerts import send_alert

    kind, seeded, secret = pii
    def slack_posts():
        return [r for r in slack.requests if r.path != "/api/1/envelope/"]

    before = len(slack_posts())
    send_alert("critical", f"Lookup failed for {seeded}", f"provider said {seeded} is invalid")
    try:
        raise ValueError(f"bad input {seeded}")
    except ValueError as error:
        sentry_sdk.capture_exception(error)
    posted = wait_for(lambda: len(slack_posts()) > before and slack_posts(), what="the Slack post")
    assert_absent(secret, json.dumps([r.json() for r in posted]), "Slack", kind)
    assert_absent(secret, json.dumps(events(sentry), default=str), "a Sentry envelope", kind)
