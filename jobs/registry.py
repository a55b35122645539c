"""Drop's job catalogue: every family declares its jobs here (`@registry.job(...)`); the names
are the enqueue contract (docs/enqueue.md). Declaring binds nothing: `jobs.app` does."""

from __future__ import annotations

from worker.registry import JobRegistry

registry = JobRegistry()
