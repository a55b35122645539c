"""The alert sender as on-call sees it: Slack format, dedup/cooldown/resolve, 429, outages."""

from __future__ import annotations

import itertools
import logging
import re
import time

from worker import alerts
from worker.alerts import Severity, resolve_alert, send_alert
from worker.slack import SlackNotifier, get_notifier

from .conftest import free_port


def test_message_has_seed_format_emoji_title_message_time_and_runbook(slack):
    assert send_alert("critical", "Error spike detected", "8 job errors in the last 60 seconds",
                      runbook="error-spike")
    [req] = slack.wait(1)
    assert req.path == "/services/T000/B000/secret-token"
    text = req.json()["text"]
    lines = text.splitlines()
    assert lines[0] == "🚨 Drop Development Alert — Critical"
    assert lines[1] == "*Title:* Error spike detected"
    assert lines[2] == "*Message:* 8 job errors in the last 60 seconds"
    assert re.fullmatch(r"\*Time:\* \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", lines[3])
    assert "docs/runbook.md#error-spike" in lines[4]
    assert req.json()["blocks"][0]["text"]["text"].startswith("🚨")


def test_each_severity_has_its_emoji(slack):
    for severity in ("info", "warning", "high", "critical"):
        send_alert(severity, f"t-{severity}", "m")
    texts = [r.json()["text"] for r in slack.wait(4)]
    assert [t.split(" ", 1)[0] for t in texts] == ["ℹ️", "⚠️", "🔥", "🚨"]


def test_personal_data_never_reaches_slack(slack):
    send_alert("high", "Payment failed for ola.nordmann@example.no",
               "account NO93 8601 1117 947, pid 01017012345, iban NO9386011117947")
    body = slack.wait(1)[0].body.decode()
    for leaked in ("ola.nordmann@example.no", "01017012345", "8601 1117 947", "NO9386011117947"):
        assert leaked not in body
    assert "[redacted]" in body


def test_keyed_alert_is_sent_once_per_cooldown_then_resolved_once(slack):
    assert send_alert("critical", "Circuit breaker open: x", "m", key="k1")
    assert not send_alert("critical", "Circuit breaker open: x", "m", key="k1")
    assert resolve_alert("k1")
    assert not resolve_alert("k1")  # a second replica resolving finds nothing to do
    texts = [r.json()["text"] for r in slack.wait(2)]
    time.sleep(0.2)
    assert len(slack.requests) == 2
    assert texts[1].startswith("✅ Drop Development Alert — Resolved")
    assert "*Title:* Resolved: Circuit breaker open: x" in texts[1]
    # After resolution a new occurrence alerts at once.
    assert send_alert("critical", "Circuit breaker open: x", "again", key="k1")


def test_cooldown_expiry_re_sends_a_reminder(slack):
    assert send_alert("high", "t", "m", key="k2", cooldown_s=1)
    time.sleep(1.1)
    assert send_alert("high", "t", "m", key="k2", cooldown_s=1)
    slack.wait(2)


def test_429_retry_after_is_honoured(slack):
    slack.responses.append((429, {"Retry-After": "1"}, b"rate_limited"))
    send_alert("info", "first", "m")
    first, second = slack.wait(2)
    assert first.body == second.body
    assert second.at - first.at >= 0.95


def test_one_message_per_second_by_default(receiver):
    notifier = SlackNotifier(f"{receiver.url}/hook", min_interval_s=1.0)
    for i in range(3):
        notifier.post({"text": str(i)}, str(i))
    got = receiver.wait(3)
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert all(g >= 0.95 for g in gaps), gaps
    notifier.close()


def test_slack_down_falls_back_to_the_log_without_blocking(caplog):
    notifier = SlackNotifier(f"http://127.0.0.1:{free_port()}/hook", max_attempts=1)
    with caplog.at_level(logging.ERROR, logger="worker.slack"):
        started = time.monotonic()
        assert notifier.post({"text": "x"}, "[critical] Error spike detected: 8 errors")
        assert time.monotonic() - started < 0.05
        assert notifier.flush(5)
    assert "Error spike detected: 8 errors" in caplog.text
    assert "/hook" not in caplog.text  # the webhook URL is a secret
    # Slack is now considered down for a while: the next alert goes straight to the log.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="worker.slack"):
        notifier.post({"text": "y"}, "second alert")
        notifier.flush(1)
    assert "second alert" in caplog.text
    notifier.close()


def test_hanging_slack_never_blocks_the_caller(slack):
    slack.hang = True
    started = time.monotonic()
    for i in range(5):
        send_alert("critical", f"t{i}", "m")
    assert time.monotonic() - started < 0.5
    slack.wait(1)


def test_alerts_without_webhook_go_to_the_log(monkeypatch, caplog):
    from worker.settings import get_settings
    from worker.slack import reset_notifier

    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)
    get_settings.cache_clear()
    reset_notifier()
    with caplog.at_level(logging.INFO, logger="worker.alerts"):
        assert send_alert(Severity.WARNING, "Queue latency high", "pisp 400 s", runbook="queue-latency")
    assert "Queue latency high: pisp 400 s" in caplog.text
    assert not get_notifier().enabled


def test_redis_down_still_alerts_but_without_floods(slack, monkeypatch):
    from worker.redis_client import reset_redis
    from worker.settings import get_settings

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    get_settings.cache_clear()
    reset_redis()
    assert send_alert("critical", "t", "m", key="redis-down-test")
    assert not send_alert("critical", "t", "m", key="redis-down-test")
    slack.wait(1)
    alerts._local_sent.clear()
