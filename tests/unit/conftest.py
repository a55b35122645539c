"""The unit tier: pure rules, money, settings, digests. No PostgreSQL, Redis or network.

`pytest tests/unit` runs with both servers stopped: the root conftest starts no embedded
servers for this tier, and this fixture replaces the per-test Redis namespace (nothing here
may touch Redis; a test that does fails on the unreachable placeholder URL).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def redis_namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from worker.settings import get_settings

    monkeypatch.setenv("DROP_REDIS_NAMESPACE", "unit")
    get_settings.cache_clear()
    yield "unit"
    get_settings.cache_clear()
