"""Housekeeping prunes what has outlived its purpose, and nothing that is still needed."""

from jobs.housekeeping import prune


def test_prune_keeps_what_is_still_needed(db, sql):
    sql("""INSERT INTO processed_events (event_id, consumer_group, processed_at) VALUES
           ('old', 'kyc', now() - interval '31 days'), ('recent', 'kyc', now() - interval '29 days')""")
    sql("""INSERT INTO job_outbox (job, payload, idempotency_key, done_at, error, created_at) VALUES
           ('x', '{}', 'done-old', now() - interval '8 days', NULL, now() - interval '8 days'),
           ('x', '{}', 'done-recent', now() - interval '6 days', NULL, now() - interval '6 days'),
           ('x', '{}', 'pending-old', NULL, NULL, now() - interval '100 days'),
           ('x', '{}', 'failed-old', NULL, 'dead-lettered: x', now() - interval '91 days'),
           ('x', '{}', 'failed-recent', NULL, 'dead-lettered: x', now() - interval '60 days')""")
    sql("""INSERT INTO dead_letters (message_id, job, queue_name, message, reason, failed_at, replayed_at) VALUES
           ('m1', 'x', 'q', '{}', 'r', now() - interval '40 days', now() - interval '31 days'),
           ('m2', 'x', 'q', '{}', 'r', now() - interval '40 days', NULL),
           ('m3', 'x', 'q', '{}', 'r', now() - interval '91 days', NULL)""")
    # A recorded fire names its outbox row (any id: the row itself may already be pruned).
    sql("""INSERT INTO scheduler_fires (job, slot, leader, fired_at, outbox_id) VALUES
           ('j', now() - interval '31 days', 'a', now() - interval '31 days', 1),
           ('j', now() - interval '1 day', 'a', now() - interval '1 day', 2)""")

    counts = prune()
    assert counts == {
        "processed_events": 1,
        "job_outbox": 1,
        "job_outbox_failed": 1,
        "dead_letters": 1,
        "dead_letters_open": 1,
        "scheduler_fires": 1,
    }
    assert [r["event_id"] for r in sql("SELECT event_id FROM processed_events")] == ["recent"]
    assert sorted(r["idempotency_key"] for r in sql("SELECT idempotency_key FROM job_outbox")) == [
        "done-recent",
        "failed-recent",
        "pending-old",
    ]  # pending work is never pruned
    assert [r["message_id"] for r in sql("SELECT message_id FROM dead_letters")] == ["m2"]
    assert prune() == dict.fromkeys(counts, 0)  # idempotent
