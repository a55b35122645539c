"""Drop's job catalogue: every family declares its jobs here (`@registry.job(...)`); the names
are the enqueue contract (docs/enqueue.md). Declaring binds nothing: `jobs.app` does."""

from __future__ import annotations

from worker.registry import JobRegistry

registry = JobRegistry()

# A high-volume job's share of the environment's Sentry trace rate (one trace in ten of the others').
HIGH_VOLUME_TRACES = 0.1
