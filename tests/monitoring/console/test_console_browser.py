"""The console in a real browser (Debian's chromium through chromium-driver, driven by selenium),
against real processes: the monitor (`python -m monitoring`) and, for the replay, a worker pool
(`python -m worker.pool`, whose relay fork sends the reopened outbox row). A screenshot of each
page lands in .data/screenshots/ (DROP_SCREENSHOT_DIR), not committed, for a person to look at."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for

from ..conftest import free_port
from .conftest import PASSWORDS, PERSON
from .test_console_http import viewer_csrf

ROOT = Path(__file__).resolve().parents[3]
SCREENSHOTS = Path(os.environ.get("DROP_SCREENSHOT_DIR", ROOT / ".data" / "screenshots"))

pytestmark = pytest.mark.slow


def _missing_browser() -> str | None:
    for binary in ("chromium", "chromedriver"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (apt-get install chromium chromium-driver; .ci/run does)"
    return None


@pytest.fixture
def browser() -> Iterator[object]:
    missing = _missing_browser()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1100", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _spawn(args: list[str], tmp_path: Path, name: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "DROP_DATA_DIR": str(tmp_path),
                                                 **env},
                            start_new_session=True, stdout=open(tmp_path / f"{name}.log", "ab"),
                            stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def monitor_process(db, tmp_path, console_users) -> Iterator[str]:
    """`python -m monitoring` with the console on: its base URL once it answers."""
    port = free_port()
    proc = _spawn([sys.executable, "-m", "monitoring"], tmp_path, "monitor", DROP_MONITOR_PORT=str(port),
                  DROP_CONSOLE_USERS=console_users, DROP_MONITOR_EVAL_INTERVAL_S="60")
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/console/login", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answers, timeout=30, what="the monitor process to serve /console/login")
        yield base
    finally:
        _stop(proc)


@pytest.fixture
def worker_pool(db, tmp_path) -> Iterator[None]:
    proc = _spawn([sys.executable, "-m", "worker.pool", "--processes", "1", "--threads", "2"], tmp_path, "pool",
                  DROP_WORKER_METRICS_PORT="0")
    try:
        yield
    finally:
        _stop(proc)


def shoot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def log_in(driver, base: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/console/login")
    driver.find_element(By.NAME, "username").send_keys(name)
    driver.find_element(By.NAME, "password").send_keys(PASSWORDS[name])
    shoot(driver, "login")
    driver.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    wait_for(lambda: driver.current_url.rstrip("/").endswith("/console"), timeout=10,
             what=f"the overview after login (at {driver.current_url}: {driver.page_source[:1500]})")


def test_a_viewer_sees_a_dead_letter_but_no_replay_and_a_forged_post_is_403(browser, monitor_process,
                                                                            seed_dead_letter, sql):
    from selenium.webdriver.common.by import By

    dead = seed_dead_letter(reason="HTTPStatusError: 503 Service Unavailable")
    log_in(browser, monitor_process, "vera")
    browser.get(f"{monitor_process}/console/dead-letters")
    link = browser.find_element(By.LINK_TEXT, str(dead["id"]))
    shoot(browser, "viewer-dead-letters")
    link.click()
    wait_for(lambda: "503 Service Unavailable" in browser.find_element(By.ID, "reason").text, what="the detail page")
    shoot(browser, "viewer-dead-letter")
    assert not browser.find_elements(By.TAG_NAME, "button") or all(
        b.text == "Log out" for b in browser.find_elements(By.TAG_NAME, "button"))
    assert "Replay" not in browser.page_source

    cookie = browser.get_cookie("drop_console")["value"]
    for token in ("", viewer_csrf(cookie)):
        forged = httpx.post(f"{monitor_process}/console/dead-letters/replay", cookies={"drop_console": cookie},
                            data={"id": str(dead["id"]), "csrf_token": token})
        assert forged.status_code == 403
    assert sql("SELECT replayed_at FROM dead_letters WHERE id = %s", (dead["id"],))[0]["replayed_at"] is None


def test_an_operator_replays_from_the_page_and_sees_the_job_done(browser, monitor_process, worker_pool,
                                                                 seed_dead_letter, sql):
    from selenium.webdriver.common.by import By

    dead = seed_dead_letter(job="housekeeping.prune", queue="maintenance", reason="OperationalError: timeout")
    log_in(browser, monitor_process, "otto")
    browser.get(f"{monitor_process}/console/dead-letters/{dead['id']}")
    shoot(browser, "operator-dead-letter")
    browser.find_element(By.ID, "replay").click()
    wait_for(lambda: "Replayed 1 dead letter(s)" in browser.page_source, what="the replay notice")
    assert browser.find_element(By.ID, "replayed").is_displayed()
    browser.find_element(By.ID, "outbox-link").click()

    def job_done() -> bool:
        browser.refresh()
        return 'class="state-done">done<' in browser.page_source

    wait_for(job_done, timeout=90, interval=1, what="the replayed job to be done (worker pool)")
    shoot(browser, "operator-job-done")
    audit = sql("SELECT details FROM audit_log WHERE action = 'console.dlq.replay'")
    assert [a["details"]["dead_letter_ids"] for a in audit] == [[dead["id"]]]
    assert audit[0]["details"]["operator"] == "otto"


def _seed_account(sql: Callable[..., list[dict]]) -> str:
    sql("INSERT INTO users (id, first_name, last_name) VALUES ('u_kari', %s, %s)", tuple(PERSON["name"].split()))
    sql("""INSERT INTO bank_accounts (id, user_id, provider_account_id, consent_id)
           VALUES ('acct_kari', 'u_kari', %s, 'consent-1')""", (PERSON["iban"],))
    sql("""INSERT INTO aisp_reads (bank_account_id, initiated_by, requested_at, outcome, http_status)
           SELECT 'acct_kari', 'scheduler', now() - make_interval(hours => 6 * g), 'ok', 200
             FROM generate_series(0, 3) g""")
    return "acct_kari"


def test_no_page_shows_seeded_personal_data_and_each_page_is_photographed(browser, monitor_process,
                                                                          seed_dead_letter, sql):
    from selenium.webdriver.common.by import By

    dead = seed_dead_letter(job="kyc.sumsub_webhook", queue="kyc", payload={"body": str(PERSON), **PERSON},
                            # an old, unscrubbed reason; names only as a field (prose names cannot be
                            # recognised: worker/pii.py, docs/console.md)
                            reason=f"UnknownApplicant: first_name={PERSON['name']}, {PERSON['national_id']} "
                                   f"{PERSON['email']} {PERSON['iban']}")
    account = _seed_account(sql)
    log_in(browser, monitor_process, "otto")
    pages = {
        "overview": "/console/",
        "jobs": "/console/jobs",
        "job": f"/console/jobs/{dead['outbox_id']}",
        "dead-letters": "/console/dead-letters",
        "dead-letter": f"/console/dead-letters/{dead['id']}",
        "breakers": "/console/breakers",
        "scheduler": "/console/scheduler",
        "psd2": f"/console/psd2?account={account}",
    }
    for name, path in pages.items():
        browser.get(monitor_process + path)
        wait_for(lambda: browser.find_elements(By.ID, "live"), what=f"the {name} page")
        shoot(browser, name)
        source = browser.page_source
        for value in [*PERSON.values(), "Kari", "Nordmann"]:
            assert value not in source, f"{name} shows {value!r}"
    browser.get(monitor_process + pages["psd2"])
    assert browser.find_element(By.ID, "unattended").text == "4 of 4"
    assert "(Oslo)" in browser.find_element(By.ID, "next-allowed").text  # not now: the quota is full
    # purge asks first, in the browser too
    browser.get(monitor_process + pages["dead-letter"])
    browser.find_element(By.ID, "purge").click()
    wait_for(lambda: browser.find_elements(By.ID, "confirm-purge"), what="the purge confirmation")
    shoot(browser, "purge-confirm")
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 1
    browser.find_element(By.ID, "confirm-purge").click()
    wait_for(lambda: "Purged 1 dead letter(s)" in browser.page_source, what="the purge notice")
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0
