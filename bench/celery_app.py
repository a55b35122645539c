"""The peer: the SAME KYC handler (`jobs.kyc.process_webhook`) run by Celery.

Redis broker on the same server (own key prefix), `acks_late`, started with the same shape as our
pool (2 worker processes × 8 threads each):

    celery -A bench.celery_app worker --pool threads --concurrency 8 -Q kyc

The task gives the handler what a Dramatiq message gives it: the outbox id, so the row is marked
done inside the effect transaction exactly as in our worker (worker.context reads CurrentMessage).
That is the task a Celery user writes: one task per webhook, `.delay()`ed by the web tier, the
handler's transaction inside it (the outbox mark is the bench's way of seeing the effect land; ours
makes the same mark).

With SENTRY_DSN set (the deployed comparison) the worker starts Sentry as a careful Celery user
would: the Celery integration, traces at BENCH_CELERY_TRACES_RATE (the bench passes the rate our
KYC family gets: the environment's 10 % × its share), the Redis integration off, breadcrumbs from
WARNING — the same settings as ours, so the comparison is not won by Sentry defaults.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from celery import Celery
from dramatiq.middleware import CurrentMessage

import jobs.app  # noqa: F401  (the composition root: drop-worker's broker and jobs)
from jobs.kyc import process_webhook

if os.environ.get("SENTRY_DSN"):
    import logging

    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.integrations.redis import RedisIntegration

    sentry_sdk.init(dsn=os.environ["SENTRY_DSN"], traces_sample_rate=float(os.environ.get("BENCH_CELERY_TRACES_RATE",
                                                                                              "0.01")),
                    integrations=[CeleryIntegration(), LoggingIntegration(level=logging.WARNING,
                                                                          event_level=logging.ERROR)],
                    disabled_integrations=[RedisIntegration], send_default_pii=False)

namespace = os.environ.get("BENCH_NAMESPACE", "bench")
app = Celery("drop_bench", broker=os.environ["REDIS_URL"])
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    task_default_queue="kyc",
    broker_transport_options={"global_keyprefix": f"{namespace}-celery:"},
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="kyc.sumsub_webhook", acks_late=True)
def sumsub_webhook(body: Any = None, headers: Any = None, received_at: Any = None,
                   outbox_id: int | None = None) -> str:
    token = CurrentMessage._MESSAGE.set(SimpleNamespace(options={"outbox_id": outbox_id}))  # type: ignore[arg-type]
    try:
        return process_webhook(body, headers, received_at)
    finally:
        CurrentMessage._MESSAGE.reset(token)
