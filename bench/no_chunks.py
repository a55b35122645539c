"""Bench-only: the relay sends one message per outbox row, as before chunks (the comparison row).

    python -m dramatiq jobs.app bench.no_chunks
"""

from __future__ import annotations

import jobs.app  # noqa: F401  (the composition root: drop-worker's broker and jobs)
from worker import relay

relay.chunked = lambda broker, messages, sizes: messages  # type: ignore[assignment]
