"""Console page render times with 100k outbox rows (`python -m bench console`; goal < 200 ms).

Seeds a private schema: 100,000 outbox rows over a week (most done, some in the last hour for the
chart, 5 % dead-lettered with their dead letters, the rest pending or relayed), starts the
monitor's HTTP server in this process with the console on, logs in, and times whole HTTP requests
(query, render, transfer) for each page, after one warm-up request. Prints median and p95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import httpx

from bench.harness import Sandboxed, ensure_servers

PAGES = {
    "overview": "/console/",
    "dead letters (all open)": "/console/dead-letters",
    "dead-letter search (job + reason)": "/console/dead-letters?job=pisp.poll_status&reason=503",
    "dead letters, 20th page": None,  # found by following "older" links
    "jobs search (job + state)": "/console/jobs?job=pisp.poll_status&state=done",
    "jobs search (key prefix)": "/console/jobs?key_prefix=bench-77",
    "jobs search (time range)": "/console/jobs?from=2000-01-01T00:00&to=2100-01-01T00:00&state=error",
    "jobs, oldest page (keyset)": "/console/jobs?before=60",
}
JOBS = ["kyc.sumsub_webhook", "pisp.poll_status", "aisp.refresh_account", "sca.expire_timeouts", "pisp.sweep",
        "housekeeping.prune"]


def seed(sb: Sandboxed, rows: int) -> None:
    jobs = "ARRAY[" + ",".join(f"'{j}'" for j in JOBS) + "]"
    sb.sql(f"""INSERT INTO job_outbox (job, payload, idempotency_key, created_at, available_at, relayed_at,
                                      relay_count, done_at, error)
               SELECT ({jobs})[1 + g % 6], jsonb_build_object('transaction_id', 'tx_' || g),
                      'bench-' || g, t, t, CASE WHEN g % 10 <> 0 THEN t + interval '1 second' END,
                      CASE WHEN g % 10 <> 0 THEN 1 ELSE 0 END,
                      CASE WHEN g % 20 NOT IN (0, 1, 10) THEN t + interval '2 seconds' END,
                      CASE WHEN g % 20 = 1 THEN 'dead-lettered: HTTPStatusError: 503 from provider' END
                 FROM (SELECT g, now() - make_interval(secs => ({rows} - g) * 604800.0 / {rows}) AS t
                         FROM generate_series(1, {rows}) g) s""")
    # the last hour, for the chart: 1,200 more done rows
    sb.sql(f"""INSERT INTO job_outbox (job, payload, idempotency_key, created_at, relayed_at, done_at)
               SELECT ({jobs})[1 + g % 6], '{{}}', 'bench-hour-' || g, now() - make_interval(secs => g * 3),
                      now() - make_interval(secs => g * 3), now() - make_interval(secs => g * 3)
                 FROM generate_series(1, 1200) g""")
    sb.sql("""INSERT INTO dead_letters (message_id, job, queue_name, message, outbox_id, reason, retries, failed_at)
              SELECT 'm-' || id, job, 'default', jsonb_build_object('kwargs', payload), id,
                     substr(error, 16) || ' (attempt ' || (id % 4) || ')', 3, created_at + interval '5 seconds'
                FROM job_outbox WHERE error IS NOT NULL""")
    sb.sql("ANALYZE")


def measure(client: httpx.Client, path: str, repeat: int) -> tuple[float, float, str]:
    client.get(path)  # warm-up: connection, plan cache, templates compiled
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1], response.text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench console")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    embedded = ensure_servers()
    try:
        with Sandboxed("console") as sb:
            from monitoring.console.auth import hash_password
            from monitoring.server import serve
            from worker.settings import get_settings

            seed(sb, args.rows)
            counts = sb.sql("SELECT (SELECT count(*) FROM job_outbox), (SELECT count(*) FROM dead_letters)")[0]
            os.environ["DROP_CONSOLE_USERS"] = f"bench:viewer:{hash_password('bench-password')}"
            get_settings.cache_clear()
            server = serve("127.0.0.1", 0)
            try:
                client = httpx.Client(base_url=f"http://127.0.0.1:{server.server_address[1]}", timeout=30)
                assert client.post("/console/login", data={"username": "bench", "password": "bench-password"}
                                   ).status_code == 303
                path = "/console/dead-letters"
                for _ in range(19):
                    page = client.get(path).text
                    path = page.split('rel="next"')[0].rsplit('href="', 1)[1].split('"')[0].replace("&amp;", "&")
                PAGES["dead letters, 20th page"] = path
                print(f"console render times: {counts[0]:,} outbox rows, {counts[1]:,} dead letters, "
                      f"{args.repeat} requests each (whole HTTP request, one client)")
                for name, page_path in PAGES.items():
                    median, p95, _ = measure(client, str(page_path), args.repeat)
                    print(f"  {name:36} median {median:6.1f} ms   p95 {p95:6.1f} ms")
            finally:
                server.shutdown()
                os.environ.pop("DROP_CONSOLE_USERS", None)
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]
    return 0
