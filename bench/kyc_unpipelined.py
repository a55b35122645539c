"""Bench-only shim: the KYC job's transaction as it was before the profile-driven change (one
round trip per statement), so `python -m bench kyc` measures before and after in one run:

    python -m dramatiq jobs bench.kyc_unpipelined --queues kyc
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

import jobs.kyc
from db import pool


@contextmanager
def _plain_transaction(*, pipeline: bool = False) -> Iterator[psycopg.Connection]:
    with pool.transaction() as conn:
        yield conn


jobs.kyc.transaction = _plain_transaction  # type: ignore[assignment]
