"""The provider layer: every job talks to Neonomics and Sumsub through this package only.

    from worker.providers import get_neonomics, get_sumsub
    balances = get_neonomics().get_balances(account_id, consent_id, psu_ip=None)

The clients are built from settings (NEONOMICS_*/SUMSUB_* variables), one per process (each
keeps its connection pool and, for Neonomics, its cached token shared by the threads).
Errors are in `worker.providers.errors`; all are TransientError or PermanentError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.process_local import ProcessLocal
from worker.providers.errors import (  # noqa: F401  (the public error types)
    AccessExceededError,
    AuthenticationError,
    CircuitOpenError,
    ClientError,
    ConflictError,
    ConsentError,
    MalformedResponseError,
    NotFoundError,
    ProviderConnectionError,
    ProviderError,
    ProviderPermanentError,
    ProviderTimeout,
    ProviderTransientError,
    RateLimitedError,
    ServerError,
    UnexpectedStatusError,
)
from worker.settings import get_settings

if TYPE_CHECKING:
    from worker.providers.neonomics import NeonomicsClient
    from worker.providers.sumsub import SumsubClient

_clients: ProcessLocal[tuple[Any, ...], Any] = ProcessLocal(close=lambda client: client.close())


def get_neonomics() -> NeonomicsClient:
    """The process's Neonomics client, configured from settings."""
    # Imported here: the clients import worker.breaker, which imports this package's errors.
    from worker.providers.neonomics import NeonomicsClient
    s = get_settings()
    secret = s.neonomics_client_secret.get_secret_value() if s.neonomics_client_secret else ""
    cache_key = ("neonomics", s.neonomics_api_url, s.neonomics_client_id, s.provider_timeout_s)
    client: NeonomicsClient = _clients.get(cache_key, lambda: NeonomicsClient(
        s.neonomics_api_url, s.neonomics_client_id or "", secret, timeout=s.provider_timeout_s))
    return client


def get_sumsub() -> SumsubClient:
    """The process's Sumsub client, configured from settings."""
    from worker.providers.sumsub import SumsubClient  # as above: after worker.breaker
    s = get_settings()
    token = s.sumsub_app_token.get_secret_value() if s.sumsub_app_token else ""
    secret = s.sumsub_secret_key.get_secret_value().encode() if s.sumsub_secret_key else b""
    cache_key = ("sumsub", s.sumsub_api_url, s.redis_namespace, s.provider_timeout_s, s.sumsub_rate_limit_per_min)
    client: SumsubClient = _clients.get(cache_key, lambda: SumsubClient(
        s.sumsub_api_url, token, secret, timeout=s.provider_timeout_s, rate_limit=s.sumsub_rate_limit_per_min))
    return client


def reset_clients() -> None:
    """Close and forget the cached clients (tests; after settings change), the async ones too."""
    from worker.providers.neonomics import forget_async_clients  # as above: after worker.breaker

    _clients.clear()
    forget_async_clients()
