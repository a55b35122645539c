import os
import subprocess
import sys

import pytest

from worker.settings import PRODUCTION_REQUIRED, ConfigurationError, build_settings

PROD_ENV = {
    "DROP_ENV": "production",
    "DATABASE_URL": "postgresql://u@db/drop?sslmode=verify-full",
    "REDIS_URL": "redis://:cache-password-1@cache:6379/0",
    "NEONOMICS_CLIENT_ID": "client",
    "NEONOMICS_CLIENT_SECRET": "neo-secret-value-123",
    "SUMSUB_APP_TOKEN": "sumsub-token-value-456",
    "SUMSUB_SECRET_KEY": "sumsub-secret-value-789",
    "SUMSUB_WEBHOOK_SECRET": "sumsub-webhook-secret-321",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/slack-secret-000",
}


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*PROD_ENV, "SCA_TIMEOUT_SECONDS", "SENTRY_DSN", "NEONOMICS_API_URL", "SUMSUB_API_URL",
                 "DROP_MONITOR_HOST", "DROP_MONITOR_EXPOSE"]:
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
        [sys.executable, "-m", "monitoring.cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["drop-worker: configuration error: SUMSUB_SECRET_KEY is required when DROP_ENV=production"]
    for secret in ("neo-secret-value-123", "sumsub-token-value-456", "slack-secret-000"):
        assert secret not in proc.stdout + proc.stderr


# Weak production settings: each refused with one line naming the variable, never the value.
WEAK_PRODUCTION = [
    ("NEONOMICS_API_URL", "http://sandbox.internal:8700", "https://"),
    ("SUMSUB_API_URL", "https://127.0.0.1:8700", "loopback"),
    ("NEONOMICS_API_URL", "https://localhost/neo", "loopback"),
    ("SLACK_WEBHOOK_URL", "http://alerts.evil.example/hook-value", "https://hooks.slack.com/"),
    ("REDIS_URL", "redis://cache:6379/0", "password or TLS"),
    ("DATABASE_URL", "postgresql://u:pw-value@db/drop", "sslmode"),
    ("DATABASE_URL", "postgresql://u:pw-value@db/drop?sslmode=prefer", "sslmode"),
    ("NEONOMICS_CLIENT_SECRET", "x", "shorter than 16"),
    ("SUMSUB_WEBHOOK_SECRET", "short-secret", "shorter than 16"),
    ("SUMSUB_APP_TOKEN", "tok", "shorter than 16"),
    ("DROP_MONITOR_HOST", "0.0.0.0", "DROP_MONITOR_EXPOSE"),
]


@pytest.mark.parametrize(("name", "value", "why"), WEAK_PRODUCTION)
def test_weak_production_settings_are_refused_naming_the_variable(clean_env, name, value, why):
    for k, v in PROD_ENV.items():
        clean_env.setenv(k, v)
    clean_env.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        build_settings()
    message = str(info.value)
    assert message.startswith(name) and why in message
    assert value not in message
    assert "\n" not in message


def test_production_needs_an_explicit_webhook_secret(clean_env):
    for k, v in PROD_ENV.items():
        if k != "SUMSUB_WEBHOOK_SECRET":
            clean_env.setenv(k, v)
    with pytest.raises(ConfigurationError, match="SUMSUB_WEBHOOK_SECRET is required"):
        build_settings()


def test_production_accepts_tls_redis_and_an_opened_monitor(clean_env):
    for k, v in PROD_ENV.items():
        clean_env.setenv(k, v)
    clean_env.setenv("REDIS_URL", "rediss://cache:6380/0")
    clean_env.setenv("DROP_MONITOR_HOST", "0.0.0.0")
    clean_env.setenv("DROP_MONITOR_EXPOSE", "true")
    assert build_settings().monitor_expose is True


def test_staging_checks_secret_lengths_but_allows_local_stand_ins(clean_env):
    clean_env.setenv("DROP_ENV", "staging")
    clean_env.setenv("SLACK_WEBHOOK_URL", "http://127.0.0.1:9/hook")
    assert build_settings().drop_env == "staging"
    clean_env.setenv("SUMSUB_SECRET_KEY", "changeme")
    with pytest.raises(ConfigurationError, match=r"^SUMSUB_SECRET_KEY is shorter than 16"):
        build_settings()


# An Argon2id hash as `drop-jobs console hash-password` prints it (commas and '$' included).
CONSOLE_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA"


def test_console_users_are_parsed_despite_the_commas_in_their_hashes(clean_env):
    clean_env.setenv("DROP_CONSOLE_USERS", f"kari:operator:{CONSOLE_HASH}, ola:viewer:{CONSOLE_HASH}")
    users = build_settings().console_users
    assert {n: (u.role, u.password_hash) for n, u in users.items()} == {
        "kari": ("operator", CONSOLE_HASH), "ola": ("viewer", CONSOLE_HASH)}
    assert users["kari"].may_act and not users["ola"].may_act
    assert CONSOLE_HASH not in repr(users) and CONSOLE_HASH not in repr(build_settings())


def test_the_console_is_off_without_users(clean_env):
    clean_env.delenv("DROP_CONSOLE_USERS", raising=False)
    assert build_settings().console_users == {}


@pytest.mark.parametrize(("value", "why"), [
    (f"kari:admin:{CONSOLE_HASH}", "entry 1: the role must be viewer or operator"),
    (f"kari:operator:{CONSOLE_HASH},ola:viewer:plaintext-password", "entry 2: the hash must be"),
    (f"kari:operator:{CONSOLE_HASH},kari:viewer:{CONSOLE_HASH}", "entry 2: the name is listed twice"),
    (f"ka ri:viewer:{CONSOLE_HASH}", "entry 1: the name must be"),
])
def test_a_malformed_console_user_is_named_by_position_never_by_value(clean_env, value, why):
    clean_env.setenv("DROP_CONSOLE_USERS", value)
    with pytest.raises(ConfigurationError) as error:
        build_settings()
    assert why in str(error.value) and "DROP_CONSOLE_USERS" in str(error.value)
    assert "plaintext-password" not in str(error.value) and "argon2" not in str(error.value)
