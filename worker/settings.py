"""The one place where configuration is read (12-factor, from the environment).

Every variable of the README's configuration table is here. Secrets are `SecretStr`, so printing a
Settings object never shows them. `load_settings()` is what processes call at start: it
validates and, on a problem, exits with one line naming the variable (never its value).
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import db.pool
from db.pool import PoolConfig

Environment = Literal["development", "staging", "production"]

# Required when DROP_ENV=production: no embedded servers, no unsigned provider calls, and an
# on-call channel that is not just a log file.
PRODUCTION_REQUIRED = (
    "DATABASE_URL",
    "REDIS_URL",
    "NEONOMICS_CLIENT_ID",
    "NEONOMICS_CLIENT_SECRET",
    "SUMSUB_APP_TOKEN",
    "SUMSUB_SECRET_KEY",
    "SLACK_WEBHOOK_URL",
)


class ConfigurationError(Exception):
    """A setting is missing or invalid; the message names the variable, never its value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", populate_by_name=True)

    # --- the cross-system contract (README: Configuration) ----------------------------
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    drop_env: Environment = Field(default="development", validation_alias="DROP_ENV")

    neonomics_api_url: str = Field(default="https://api.neonomics.io", validation_alias="NEONOMICS_API_URL")
    neonomics_client_id: str | None = Field(default=None, validation_alias="NEONOMICS_CLIENT_ID")
    neonomics_client_secret: SecretStr | None = Field(default=None, validation_alias="NEONOMICS_CLIENT_SECRET")

    sumsub_api_url: str = Field(default="https://api.sumsub.com", validation_alias="SUMSUB_API_URL")
    sumsub_app_token: SecretStr | None = Field(default=None, validation_alias="SUMSUB_APP_TOKEN")
    sumsub_secret_key: SecretStr | None = Field(default=None, validation_alias="SUMSUB_SECRET_KEY")
    sumsub_webhook_secret_raw: SecretStr | None = Field(default=None, validation_alias="SUMSUB_WEBHOOK_SECRET")

    slack_webhook_url: SecretStr | None = Field(default=None, validation_alias="SLACK_WEBHOOK_URL")
    sentry_dsn: SecretStr | None = Field(default=None, validation_alias="SENTRY_DSN")
    # The environment's Sentry trace rate (worker.sentry.TRACES_SAMPLE_RATE) when unset; the
    # benchmark sets the production rate in development.
    sentry_traces_rate: float | None = Field(default=None, ge=0.0, le=1.0, validation_alias="DROP_SENTRY_TRACES_RATE")

    sca_timeout_seconds: int = Field(default=300, gt=0, le=86_400, validation_alias="SCA_TIMEOUT_SECONDS")

    # --- drop-worker's own knobs (DROP_ prefix; not part of the cross-system contract) ----
    redis_namespace: str = Field(default="drop", validation_alias="DROP_REDIS_NAMESPACE")
    data_dir: Path = Field(default=Path(".data"), validation_alias="DROP_DATA_DIR")
    monitor_host: str = Field(default="127.0.0.1", validation_alias="DROP_MONITOR_HOST")
    # The monitor (and the metrics ports) bind loopback; a non-loopback DROP_MONITOR_HOST in
    # production needs this explicit opening too (health and metrics are not for the internet).
    monitor_expose: bool = Field(default=False, validation_alias="DROP_MONITOR_EXPOSE")
    monitor_port: int = Field(default=9300, ge=0, le=65535, validation_alias="DROP_MONITOR_PORT")
    worker_metrics_port: int = Field(default=9191, ge=0, le=65535, validation_alias="DROP_WORKER_METRICS_PORT")
    scheduler_metrics_port: int = Field(default=9192, ge=0, le=65535, validation_alias="DROP_SCHEDULER_METRICS_PORT")
    # A SIGKILLed worker's messages are redelivered after this + the 5 s maintenance interval.
    worker_heartbeat_timeout_ms: int = Field(
        default=15_000, ge=1_000, le=600_000, validation_alias="DROP_WORKER_HEARTBEAT_TIMEOUT_MS"
    )
    # The worker pool stops (for its process manager to restart it) when its outbox relay fork
    # has not beaten for this long (worker.pool).
    relay_silent_limit_s: float = Field(default=90.0, ge=3, le=3600, validation_alias="DROP_RELAY_SILENT_LIMIT_S")
    db_pool_max_size: int = Field(default=10, ge=1, le=200, validation_alias="DROP_DB_POOL_MAX_SIZE")
    # Every PostgreSQL connection (db.pool.connection_options): a connect gives up after this
    # long (then the next host of a multi-host URL is tried), a statement after this long.
    db_connect_timeout_s: int = Field(default=5, ge=1, le=120, validation_alias="DROP_DB_CONNECT_TIMEOUT_S")
    db_statement_timeout_ms: int = Field(default=30_000, ge=100, le=3_600_000,
                                         validation_alias="DROP_DB_STATEMENT_TIMEOUT_MS")
    log_level: str = Field(default="INFO", validation_alias="DROP_LOG_LEVEL")

    # Provider layer (worker.breaker, worker.providers, sandbox). Tests shorten the breaker times.
    provider_timeout_s: float = Field(default=30.0, gt=0, le=300, validation_alias="DROP_PROVIDER_TIMEOUT_S")
    breaker_fail_max: int = Field(default=3, ge=1, le=1000, validation_alias="DROP_BREAKER_FAIL_MAX")
    breaker_window_s: float = Field(default=60.0, gt=0, le=3600, validation_alias="DROP_BREAKER_WINDOW_S")
    breaker_reset_timeout_s: float = Field(default=60.0, gt=0, le=3600, validation_alias="DROP_BREAKER_RESET_TIMEOUT_S")
    sumsub_rate_limit_per_min: int = Field(default=100, ge=1, le=100_000, validation_alias="DROP_SUMSUB_RATE_LIMIT")
    sandbox_host: str = Field(default="127.0.0.1", validation_alias="DROP_SANDBOX_HOST")
    sandbox_port: int = Field(default=8700, ge=0, le=65535, validation_alias="DROP_SANDBOX_PORT")
    # The sandbox admin API's token; unset: the sandbox makes one and leaves it in DROP_DATA_DIR.
    sandbox_admin_token: SecretStr | None = Field(default=None, validation_alias="DROP_SANDBOX_ADMIN_TOKEN")

    # Monitoring (monitoring/*): alert links, rule loop cadence, dedup cooldown, Slack pacing.
    runbook_url: str = Field(
        default="https://github.com/drop-no/drop-worker/blob/main/docs/runbook.md",
        validation_alias="DROP_RUNBOOK_URL",
    )
    monitor_eval_interval_s: float = Field(default=10.0, gt=0, le=600, validation_alias="DROP_MONITOR_EVAL_INTERVAL_S")
    alert_cooldown_s: int = Field(default=1800, ge=1, le=86_400, validation_alias="DROP_ALERT_COOLDOWN_S")
    error_spike_threshold: int = Field(default=5, ge=1, le=100_000, validation_alias="DROP_ERROR_SPIKE_THRESHOLD")
    slack_min_interval_s: float = Field(default=1.0, ge=0, le=60, validation_alias="DROP_SLACK_MIN_INTERVAL_S")

    # The operations console (monitoring/console, docs/console.md): off (404) while unset.
    console_users_raw: SecretStr | None = Field(default=None, validation_alias="DROP_CONSOLE_USERS")
    # A console session ends after this long without a request, and after 12 h whatever happens.
    console_session_idle_s: int = Field(default=1800, ge=60, le=43_200, validation_alias="DROP_CONSOLE_SESSION_IDLE_S")

    @field_validator("console_users_raw")
    @classmethod
    def _console_users(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            parse_console_users(value.get_secret_value())
        return value

    @property
    def console_users(self) -> dict[str, ConsoleUser]:
        """DROP_CONSOLE_USERS by name; empty: the console is off."""
        raw = self.console_users_raw.get_secret_value() if self.console_users_raw else ""
        return {u.name: u for u in parse_console_users(raw)} if raw.strip() else {}

    @field_validator("redis_namespace")
    @classmethod
    def _namespace_is_a_key_prefix(cls, value: str) -> str:
        if not value or any(c in value for c in " :*?[]"):
            raise ValueError("must be a plain Redis key prefix (no spaces, ':' or glob characters)")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
            raise ValueError("must be a redis://, rediss://, unix:// or redis+sentinel:// URL")
        return value

    @property
    def sumsub_webhook_secret(self) -> SecretStr | None:
        """Key for `X-Payload-Digest`; falls back to SUMSUB_SECRET_KEY outside production."""
        return self.sumsub_webhook_secret_raw or self.sumsub_secret_key

    def missing_for_production(self) -> list[str]:
        values = {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "NEONOMICS_CLIENT_ID": self.neonomics_client_id,
            "NEONOMICS_CLIENT_SECRET": self.neonomics_client_secret,
            "SUMSUB_APP_TOKEN": self.sumsub_app_token,
            "SUMSUB_SECRET_KEY": self.sumsub_secret_key,
            "SLACK_WEBHOOK_URL": self.slack_webhook_url,
        }
        return [name for name in PRODUCTION_REQUIRED if not values[name]]


CONSOLE_ROLES = ("viewer", "operator")
CONSOLE_HASH_PREFIX = "$argon2id$"


@dataclass(frozen=True)
class ConsoleUser:
    name: str
    role: str  # viewer: sees everything, changes nothing; operator: may replay and purge
    password_hash: str = field(repr=False)  # Argon2id, as `drop-jobs console hash-password` prints it

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


# An Argon2 hash has commas of its own (m=65536,t=3,p=4): entries split only at a comma that
# starts a new `name:role:`.
_CONSOLE_ENTRY_START = re.compile(r",\s*(?=[A-Za-z0-9._-]+:(?:" + "|".join(CONSOLE_ROLES) + r"):)")
_CONSOLE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def parse_console_users(raw: str) -> list[ConsoleUser]:
    """`name:role:hash,…`; a ValueError names the entry's position and what is wrong, never a value."""
    users: list[ConsoleUser] = []
    for position, entry in enumerate(_CONSOLE_ENTRY_START.split(raw.strip()), start=1):
        name, _, rest = entry.strip().partition(":")
        role, _, password_hash = rest.partition(":")
        if not _CONSOLE_NAME.match(name):
            raise ValueError(f"entry {position}: the name must be 1-64 letters, digits, '.', '_' or '-'")
        if role not in CONSOLE_ROLES:
            raise ValueError(f"entry {position}: the role must be viewer or operator")
        if not password_hash.startswith(CONSOLE_HASH_PREFIX) or ":" in password_hash:
            raise ValueError(f"entry {position}: the hash must be what `drop-jobs console hash-password` prints")
        if any(u.name == name for u in users):
            raise ValueError(f"entry {position}: the name is listed twice")
        users.append(ConsoleUser(name, role, password_hash))
    return users


# Shorter than this, a secret can be guessed or is a placeholder (`x`, `changeme`).
MIN_SECRET_CHARS = 16
SLACK_WEBHOOK_PREFIX = "https://hooks.slack.com/"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def deployment_problems(settings: Settings) -> list[str]:
    """What a staging or production process must not start with; each item names the variable,
    never its value. Staging gets the check that costs nothing to satisfy there (real secrets;
    its Slack and providers may be local stand-ins); production gets all of them."""
    env = settings.drop_env
    if env == "development":
        return []
    problems: list[str] = []
    secrets = {
        "NEONOMICS_CLIENT_SECRET": settings.neonomics_client_secret,
        "SUMSUB_APP_TOKEN": settings.sumsub_app_token,
        "SUMSUB_SECRET_KEY": settings.sumsub_secret_key,
        "SUMSUB_WEBHOOK_SECRET": settings.sumsub_webhook_secret_raw,
    }
    for name, secret in secrets.items():
        if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_CHARS:
            problems.append(f"{name} is shorter than {MIN_SECRET_CHARS} characters")
    if env != "production":
        return problems
    slack = settings.slack_webhook_url.get_secret_value() if settings.slack_webhook_url else None
    if slack is not None and not slack.startswith(SLACK_WEBHOOK_PREFIX):
        problems.append(f"SLACK_WEBHOOK_URL must start with {SLACK_WEBHOOK_PREFIX}")
    if settings.sumsub_webhook_secret_raw is None:
        problems.append("SUMSUB_WEBHOOK_SECRET is required when DROP_ENV=production "
                        "(no fallback to SUMSUB_SECRET_KEY)")
    for name, url in (("NEONOMICS_API_URL", settings.neonomics_api_url), ("SUMSUB_API_URL", settings.sumsub_api_url)):
        parts = urlsplit(url)
        if parts.scheme != "https":
            problems.append(f"{name} must be an https:// URL when DROP_ENV=production")
        elif is_loopback(parts.hostname):
            problems.append(f"{name} must not point at a loopback address when DROP_ENV=production")
    if settings.redis_url:
        redis = urlsplit(settings.redis_url)
        if redis.scheme != "rediss" and not redis.password:
            problems.append("REDIS_URL needs a password or TLS (rediss://) when DROP_ENV=production")
    if settings.database_url:
        sslmode = parse_qs(urlsplit(settings.database_url).query).get("sslmode", [""])[0]
        if sslmode not in ("require", "verify-ca", "verify-full"):
            problems.append("DATABASE_URL needs sslmode=require, verify-ca or verify-full when DROP_ENV=production")
    if not is_loopback(settings.monitor_host) and not settings.monitor_expose:
        problems.append("DROP_MONITOR_HOST is not a loopback address: set DROP_MONITOR_EXPOSE=true to open "
                        "the monitor and metrics ports on purpose")
    return problems


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = first.get("loc") or ("?",)
    name = str(loc[0]).upper()
    # pydantic's own str() echoes the input value: never use it, the value may be a secret.
    return f"{name}: {first.get('msg', 'invalid value')}"


def build_settings(**overrides: object) -> Settings:
    """Validate the environment (plus overrides); raise ConfigurationError naming the variable."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigurationError(_describe(error)) from None
    if settings.drop_env == "production":
        missing = settings.missing_for_production()
        if missing:
            raise ConfigurationError(f"{missing[0]} is required when DROP_ENV=production")
    problems = deployment_problems(settings)
    if problems:
        raise ConfigurationError(problems[0])
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return build_settings()


def load_settings() -> Settings:
    """For process entry points: settings, or exit with one clear line (status 2)."""
    try:
        return get_settings()
    except ConfigurationError as error:
        print(f"drop-worker: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _pool_config() -> PoolConfig:
    settings = get_settings()
    return PoolConfig(settings.database_url, settings.db_pool_max_size, settings.db_connect_timeout_s,
                      settings.db_statement_timeout_ms)


db.pool.configure(_pool_config)  # db/ is below settings: it is told where its settings come from
