"""Prometheus rules: syntax and unit tests with promtool, then the real stack end to end.

The end-to-end test runs the Debian `prometheus` and `prometheus-alertmanager` binaries on
loopback: Prometheus scrapes this test's monitor, evaluates monitoring/alerts.yml and sends to
Alertmanager, which posts to a local Slack-compatible receiver; a forced breaker open arrives.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)")


@needs_promtool
def test_alert_rules_are_valid():
    out = subprocess.run([PROMTOOL, "check", "rules", str(ROOT / "monitoring/alerts.yml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_alert_rules_unit_tests_pass():
    out = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=ROOT / "monitoring",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_example_scrape_config_is_valid(tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text((ROOT / "monitoring/prometheus.yml").read_text())
    shutil.copy(ROOT / "monitoring/alerts.yml", tmp_path / "alerts.yml")
    out = subprocess.run([PROMTOOL, "check", "config", "--syntax-only", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_runbook_section():
    import re

    rules = (ROOT / "monitoring/alerts.yml").read_text()
    runbook = (ROOT / "docs/runbook.md").read_text()
    anchors = set(re.findall(r"runbook\.md#([a-z0-9-]+)", rules))
    from monitoring import rules as monitor_rules

    anchors |= set(re.findall(r'runbook="([a-z0-9-]+)"', Path(monitor_rules.__file__).read_text()))
    anchors.add("unhandled-exception")
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
                for h in re.findall(r"^## (.+)$", runbook, flags=re.M)}
    assert anchors <= headings, anchors - headings


@pytest.mark.skipif(PROMETHEUS is None or ALERTMANAGER is None,
                    reason="prometheus / prometheus-alertmanager not installed "
                           "(Debian packages; .ci/run installs them)")
def test_breaker_open_reaches_slack_through_prometheus_and_alertmanager(db, receiver, tmp_path):
    from monitoring.server import serve
    from worker.breaker import get_breaker

    monitor = serve("127.0.0.1", 0)
    am_port, prom_port = free_port(), free_port()
    (tmp_path / "alertmanager.yml").write_text(f"""
route:
  receiver: slack
  group_by: [alertname, breaker]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: slack
    slack_configs:
      - api_url: {receiver.url}/services/T000/B000/alertmanager
        channel: "#drop-ops"
        send_resolved: true
        title: '{{{{ .CommonLabels.severity }}}}: {{{{ .CommonAnnotations.summary }}}}'
        text: '{{{{ .CommonAnnotations.runbook }}}}'
""")
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{ROOT / 'monitoring/alerts.yml'}"]
alerting:
  alertmanagers:
    - static_configs: [{{targets: ["127.0.0.1:{am_port}"]}}]
scrape_configs:
  - job_name: drop-monitor
    static_configs: [{{targets: ["127.0.0.1:{monitor.server_address[1]}"]}}]
""")
    procs = [
        subprocess.Popen([ALERTMANAGER, f"--config.file={tmp_path / 'alertmanager.yml'}",
                          f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
                          "--cluster.listen-address="],
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "am.log", "w")),
        subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'prom'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "w")),
    ]
    try:
        from worker.probes import record_job_error

        record_job_error("kyc.aml_check", "e-1")
        get_breaker("neonomics_pisp").open()
        deadline = time.monotonic() + 45
        found = None
        while time.monotonic() < deadline and found is None:
            for r in list(receiver.requests):
                if "DropPispCircuitOpen" in r.body.decode() or "PISP circuit breaker open" in r.body.decode():
                    found = r
            time.sleep(0.2)
        assert found is not None, (
            f"no alert reached the receiver; alertmanager log:\n{(tmp_path / 'am.log').read_text()[-2000:]}\n"
            f"prometheus log:\n{(tmp_path / 'prom.log').read_text()[-2000:]}")
        body = found.json()
        assert found.path == "/services/T000/B000/alertmanager"
        attachment = body["attachments"][0]
        assert attachment["title"].startswith("critical: PISP circuit breaker open")
        assert "runbook.md#circuit-breaker-open" in attachment["text"]

        # What the dashboard shows, asked of the Prometheus that scraped the monitor: every panel's
        # query is valid, and per-job series keep their job name through the scrape.
        import json
        import urllib.parse
        import urllib.request

        def query(expr: str) -> dict:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())

        dashboard = json.loads((ROOT / "monitoring/grafana-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                answer = query(target["expr"])
                assert answer["status"] == "success", (panel["title"], target["expr"], answer)
        errors = query("sum by (actor_name) (drop_job_errors_last_minute)")["data"]["result"]
        assert [r["metric"] for r in errors] == [{"actor_name": "kyc.aml_check"}]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        monitor.shutdown()
        monitor.server_close()


def test_dashboard_uses_documented_metrics():
    import json
    import re

    dashboard = json.loads((ROOT / "monitoring/grafana-dashboard.json").read_text())
    documented = (ROOT / "docs/monitoring.md").read_text()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b((?:drop|dramatiq|pisp|kyc)_[a-z_]+)", e)}
    base = {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    assert base and all(n in documented for n in base), sorted(n for n in base if n not in documented)
