"""Issue 17 item 1: three hosts on a bridge, real processes, exact counts.

a. a host cut off the network for 60 s while it holds unacked messages: they are redelivered to
   the other hosts within 30 s, every effect lands once, the host rejoins by itself;
b. the scheduler leader's host cut: the standby leads within 30 s, every minute slot around the
   cut fires exactly once, the old leader does not fire a slot again when it returns;
c. a whole host SIGKILLed under load: nothing lost or doubled, redelivery within 30 s.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.request

from sandbox.admin import SandboxAdmin
from tests.chaos import workload
from tests.conftest import wait_for
from worker.dramatiq_redis import HEARTBEATS, NOT_WORKERS, namespace
from worker.settings import get_settings

from .conftest import Cluster, Host, figure, new_seeds

REDELIVERY_LIMIT_S = 30


def ns() -> str:
    """The Redis namespace of this test (tests/conftest.py gives each its own; the hosts inherit it)."""
    return get_settings().redis_namespace


def broker_ns() -> str:
    return namespace(get_settings())


def build(c: Cluster, *, kyc: int, payments: int, accounts: int, spread_s: float) -> workload.Workload:
    def go() -> workload.Workload:
        admin = SandboxAdmin(f"http://127.0.0.1:{c.sandbox_port}", token=c.sandbox_token)
        try:
            admin.fault("neonomics.*", latency_ms=200)  # provider calls take a while: jobs are in flight
            assert c.pg is not None
            return workload.build(c.pg.url, admin, new_seeds(), kyc=kyc, payments=payments, accounts=accounts,
                                  spread_s=spread_s)
        finally:
            admin.close()

    return c.core.run(go)


def done(c: Cluster) -> int:
    return c.sql(f"SELECT count(*) AS n FROM {workload.WORKLOAD_ROWS} AND done_at IS NOT NULL")[0]["n"]


def all_done(c: Cluster, jobs: int, timeout: float) -> None:
    """Wait for every workload row to be done; on a timeout, say where the rest are."""
    try:
        wait_for(lambda: done(c) == jobs, timeout=timeout, interval=0.5, what="every job done")
    except AssertionError:
        rows = c.sql(f"""SELECT job, relayed_at IS NOT NULL AS relayed, relay_count, left(error, 60) AS error,
                                count(*) AS n FROM {workload.WORKLOAD_ROWS} AND done_at IS NULL
                          GROUP BY 1, 2, 3, 4 ORDER BY n DESC LIMIT 20""")
        sessions = c.sql("""SELECT client_addr::text, state, wait_event, now() - xact_start AS xact_age, count(*) AS n
                              FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1, 2, 3, 4""")
        queues = c.core.run(lambda: {k.decode(): c.redis().llen(k) for k in c.redis().scan_iter(f"{broker_ns()}:*")
                                     if c.redis().type(k) == b"list"})
        raise AssertionError(f"not done: {rows}; sessions: {sessions}; queues: {queues}") from None


def assert_exact(c: Cluster, w: workload.Workload) -> dict:
    def go() -> dict:
        admin = SandboxAdmin(f"http://127.0.0.1:{c.sandbox_port}", token=c.sandbox_token)
        try:
            return workload.assert_exact(c.sql_here, w, admin)
        finally:
            admin.close()

    return c.core.run(go)


def unacked(c: Cluster) -> dict[str, set[str]]:
    """Message ids in each Dramatiq worker's ack sets (taken, not yet acked), by worker id."""
    def go() -> dict[str, set[str]]:
        client = c.redis()
        found: dict[str, set[str]] = {}
        for key in client.scan_iter(f"{broker_ns()}:__acks__.*", count=1000):
            worker_id = key.decode().split(":__acks__.")[1].split(".")[0]
            found.setdefault(worker_id, set()).update(m.decode() for m in client.smembers(key))
        return found

    return c.core.run(go)


def wait_until_every_host_holds_messages(c: Cluster) -> None:
    """A cut or a kill only proves redelivery while the victim holds unacked messages."""
    wait_for(lambda: sum(1 for ids in unacked(c).values() if ids) >= 3, timeout=60, interval=0.05,
             what="every host holding unacked messages")


def in_flight_of(c: Cluster, worker_ids: set[str]) -> set[str]:
    return set().union(*(ids for wid, ids in unacked(c).items() if wid in worker_ids))


def live_workers(c: Cluster) -> set[str]:
    def go() -> set[str]:
        now_ms = int(time.time() * 1000)
        members = c.redis().zrangebyscore(f"{broker_ns()}:{HEARTBEATS}", now_ms - 3000, "+inf")
        return {m.decode() for m in members if not m.decode().startswith(NOT_WORKERS)}

    return c.core.run(go)


def workers_of(c: Cluster, host: Host) -> set[str]:
    """The host's Dramatiq worker ids: those whose heartbeat stops when the host is cut."""
    before = live_workers(c)
    c.cut(host)
    try:
        gone = wait_for(lambda: (lambda now: before - now)(live_workers(c)) or None, timeout=10, interval=0.2,
                        what=f"{host.name}'s heartbeats to stop")
    except AssertionError:
        c.rejoin(host)
        raise
    return gone


def start_all(c: Cluster) -> None:
    for h in c.hosts:
        c.start(h, "worker")
    c.start(c.hosts[0], "scheduler")
    c.start(c.hosts[1], "scheduler")
    c.start(c.hosts[2], "monitor")
    wait_for(lambda: len(live_workers(c)) >= 3, timeout=60, interval=0.5, what="three hosts' workers")


def test_a_host_cut_off_for_60_s_is_redelivered_elsewhere_and_rejoins(cluster: Cluster):
    c = cluster
    w = build(c, kyc=3000, payments=700, accounts=1000, spread_s=60)
    start_all(c)
    wait_for(lambda: done(c) >= w.jobs // 5, timeout=120, interval=0.5, what="a fifth done")
    cut_host = c.hosts[0]
    wait_until_every_host_holds_messages(c)
    cut_at = time.monotonic()
    its_workers = workers_of(c, cut_host)  # cuts the host
    held = in_flight_of(c, its_workers)  # a cut host cannot ack: its ack sets stay as they were
    assert held, "the cut host held no unacked message"
    # Redelivered: the other hosts' maintenance requeues the dead worker's messages.
    wait_for(lambda: not in_flight_of(c, its_workers), timeout=REDELIVERY_LIMIT_S + 5, interval=0.2,
             what="the cut host's messages requeued")
    redelivered_after = time.monotonic() - cut_at
    all_done_after_cut = None
    while time.monotonic() - cut_at < 60:  # the cut lasts 60 s; the other hosts carry on
        if all_done_after_cut is None and done(c) == w.jobs:
            all_done_after_cut = time.monotonic() - cut_at
        time.sleep(0.5)
    c.rejoin(cut_host)
    rejoined_at = time.monotonic()
    all_done(c, w.jobs, timeout=240)
    all_done_after_cut = all_done_after_cut or time.monotonic() - cut_at
    # The cut host rejoined by itself: its workers beat again and take new work.
    wait_for(lambda: live_workers(c) & its_workers, timeout=60, interval=0.5, what="the cut host's heartbeat")
    processed_before = processed_by(c, cut_host)
    more = build(c, kyc=300, payments=0, accounts=0, spread_s=0)
    all_done(c, w.jobs + more.jobs, timeout=120)
    wait_for(lambda: processed_by(c, cut_host) > processed_before, timeout=30,
             what="the rejoined host processing new messages")
    rejoin_s = time.monotonic() - rejoined_at
    w.users += more.users
    w.jobs += more.jobs
    counts = assert_exact(c, w)
    assert redelivered_after <= REDELIVERY_LIMIT_S, redelivered_after
    figure("cluster_host_cut", jobs=w.jobs, held_unacked=len(held), redelivered_after_s=round(redelivered_after, 1),
           all_done_after_cut_s=round(all_done_after_cut, 1), rejoined_and_working_after_s=round(rejoin_s, 1),
           lost=w.jobs - counts["done"], doubled=0)


def processed_by(c: Cluster, host: Host) -> float:
    """Messages the host's worker pool has processed (Dramatiq's counter on its metrics port)."""
    def ask() -> float:
        with urllib.request.urlopen("http://127.0.0.1:9191/metrics", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("dramatiq_messages_total{"))

    return host.ns.run(ask)


def leader_pid(c: Cluster) -> int | None:
    def go() -> int | None:
        raw = c.redis().get(f"{ns()}:scheduler:leader")
        return int(json.loads(raw)["leader"].split(":")[1]) if raw else None

    return c.core.run(go)


def test_the_scheduler_leaders_host_cut_another_leads_and_no_slot_fires_twice(cluster: Cluster):
    c = cluster
    w = build(c, kyc=500, payments=100, accounts=200, spread_s=30)
    start_all(c)
    pids = {h.procs["scheduler"].pid: h for h in c.hosts[:2]}
    leader = wait_for(lambda: pids.get(leader_pid(c) or -1), timeout=30, interval=0.5, what="a scheduler leader")
    standby = next(h for h in c.hosts[:2] if h is not leader)
    c.cut(leader)
    cut_at = time.monotonic()
    wait_for(lambda: leader_pid(c) == standby.procs["scheduler"].pid, timeout=REDELIVERY_LIMIT_S + 15,
             interval=0.2, what="the standby leading")
    takeover_s = time.monotonic() - cut_at
    time.sleep(max(0.0, 65 - (time.monotonic() - cut_at)))  # the cut spans a minute boundary
    c.rejoin(leader)
    rejoined = time.monotonic()
    all_done(c, w.jobs, timeout=180)
    # The old leader is back: give it a minute boundary to misbehave in.
    time.sleep(max(0.0, 62 - (time.monotonic() - rejoined)))
    fires = c.sql("""SELECT job, slot, count(*) AS n, min(status) AS status FROM scheduler_fires
                      WHERE job IN ('sca.expire_timeouts', 'pisp.sweep') GROUP BY job, slot ORDER BY job, slot""")
    assert all(f["n"] == 1 for f in fires), fires  # (job, slot) is the primary key: asserted, not assumed
    for job in ("sca.expire_timeouts", "pisp.sweep"):
        slots = [f["slot"] for f in fires if f["job"] == job]
        statuses = [f["status"] for f in fires if f["job"] == job]
        minutes = [(b - a).total_seconds() for a, b in itertools.pairwise(slots)]
        assert len(slots) >= 3 and all(m == 60 for m in minutes), (job, slots)  # no slot skipped
        assert all(s == "fired" for s in statuses), (job, statuses)
    # every fire enqueued its job once
    fired_rows = c.sql("SELECT count(*) AS n FROM job_outbox WHERE idempotency_key LIKE 'drop:schedule:%%'")[0]["n"]
    assert fired_rows == len(fires)
    assert_exact(c, w)
    figure("cluster_leader_cut", takeover_s=round(takeover_s, 1), minute_slots=len(fires) // 2, double_fires=0,
           missed=0, jobs=w.jobs)


def test_a_whole_host_sigkilled_under_load_loses_and_doubles_nothing(cluster: Cluster):
    c = cluster
    w = build(c, kyc=1500, payments=300, accounts=500, spread_s=30)
    start_all(c)
    wait_for(lambda: done(c) >= w.jobs // 4, timeout=120, interval=0.5, what="a quarter done")
    victim = c.hosts[1]
    # Kill while every host's worker holds messages (the ack sets of a SIGKILLed worker stay as
    # they were: what it held is read after the kill).
    wait_until_every_host_holds_messages(c)
    before = live_workers(c)
    c.kill_host(victim)
    killed_at = time.monotonic()
    its_workers = wait_for(lambda: (lambda now: before - now)(live_workers(c)) or None, timeout=10, interval=0.2,
                           what="the killed host's heartbeats to stop")
    held = in_flight_of(c, its_workers)
    assert held, "the killed host held no unacked message"
    wait_for(lambda: not in_flight_of(c, its_workers), timeout=REDELIVERY_LIMIT_S + 5, interval=0.2,
             what="the killed host's messages requeued")
    redelivered_after = time.monotonic() - killed_at
    all_done(c, w.jobs, timeout=180)
    all_done_after = time.monotonic() - killed_at
    counts = assert_exact(c, w)
    assert redelivered_after <= REDELIVERY_LIMIT_S, redelivered_after
    figure("cluster_host_sigkill", jobs=w.jobs, held_unacked=len(held),
           redelivered_after_s=round(redelivered_after, 1), all_done_after_s=round(all_done_after, 1),
           lost=w.jobs - counts["done"], doubled=0)
