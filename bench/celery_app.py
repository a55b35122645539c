"""The peer: the SAME KYC handler (`jobs.kyc.process_webhook`) run by Celery.

Redis broker on the same server (own key prefix), `acks_late`, started with the same shape as our
pool (2 worker processes × 8 threads each):

    celery -A bench.celery_app worker --pool threads --concurrency 8 -Q kyc

The task gives the handler what a Dramatiq message gives it: the outbox id, so the row is marked
done inside the effect transaction exactly as in our worker (worker.context reads CurrentMessage).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from celery import Celery
from dramatiq.middleware import CurrentMessage

import jobs.app  # noqa: F401  (the composition root: drop-worker's broker and jobs)
from jobs.kyc import process_webhook

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
