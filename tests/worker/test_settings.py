import os
import subprocess
import sys

import pytest

from worker.settings import PRODUCTION_REQUIRED, ConfigurationError, build_settings

PROD_ENV = {
    "DROP_ENV": "production",
    "DATABASE_URL": "postgresql://u@db/drop",
    "REDIS_URL": "redis://cache:6379/0",
    "NEONOMICS_CLIENT_ID": "client",
    "NEONOMICS_CLIENT_SECRET": "neo-secret-value-123",
    "SUMSUB_APP_TOKEN": "sumsub-token-value-456",
    "SUMSUB_SECRET_KEY": "sumsub-secret-value-789",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.test/services/T/B/slack-secret-000",
}


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*PROD_ENV, "SUMSUB_WEBHOOK_SECRET", "SCA_TIMEOUT_SECONDS", "SENTRY_DSN"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_follow_the_design(clean_env):
    s = build_settings()
    assert s.drop_env == "development"
    assert s.neonomics_api_url == "https://api.neonomics.io"
    assert s.sumsub_api_url == "https://api.sumsub.com"
    assert s.sca_timeout_seconds == 300
    assert s.database_url is None and s.redis_url is None  # → embedded servers
    assert s.slack_webhook_url is None and s.sentry_dsn is None


def test_webhook_secret_falls_back_to_sumsub_secret_key(clean_env):
    clean_env.setenv("SUMSUB_SECRET_KEY", "k1")
    assert build_settings().sumsub_webhook_secret.get_secret_value() == "k1"
    clean_env.setenv("SUMSUB_WEBHOOK_SECRET", "k2")
    assert build_settings().sumsub_webhook_secret.get_secret_value() == "k2"


def test_production_with_everything_set_starts(clean_env):
    for k, v in PROD_ENV.items():
        clean_env.setenv(k, v)
    s = build_settings()
    assert s.drop_env == "production"
    # Secrets never appear when the settings object is printed.
    text = repr(s) + str(s)
    for secret in ("neo-secret-value-123", "sumsub-token-value-456", "sumsub-secret-value-789", "slack-secret-000"):
        assert secret not in text


@pytest.mark.parametrize("missing", PRODUCTION_REQUIRED)
def test_production_names_the_missing_variable(clean_env, missing):
    for k, v in PROD_ENV.items():
        if k != missing:
            clean_env.setenv(k, v)
    with pytest.raises(ConfigurationError) as info:
        build_settings()
    assert missing in str(info.value)


def test_invalid_value_is_named_without_echoing_it(clean_env):
    clean_env.setenv("SCA_TIMEOUT_SECONDS", "-5")
    with pytest.raises(ConfigurationError) as info:
        build_settings()
    assert "SCA_TIMEOUT_SECONDS" in str(info.value)
    clean_env.setenv("SCA_TIMEOUT_SECONDS", "300")
    clean_env.setenv("DATABASE_URL", "mysql://user:hunter2@db/x")
    with pytest.raises(ConfigurationError) as info:
        build_settings()
    assert "DATABASE_URL" in str(info.value) and "hunter2" not in str(info.value)


def test_process_stops_with_one_clear_line_and_no_secret():
    env = {k: v for k, v in os.environ.items() if k not in PROD_ENV}
    env.update({k: v for k, v in PROD_ENV.items() if k != "SUMSUB_SECRET_KEY"})
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["drop-worker: configuration error: SUMSUB_SECRET_KEY is required when DROP_ENV=production"]
    for secret in ("neo-secret-value-123", "sumsub-token-value-456", "slack-secret-000"):
        assert secret not in proc.stdout + proc.stderr
