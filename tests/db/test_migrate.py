import threading
import uuid

import psycopg
import pytest

from db.migrate import MigrationError, discover, migrate
from tests.conftest import BASE_DATABASE_URL, with_search_path


@pytest.fixture
def empty_schema():
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(BASE_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield with_search_path(BASE_DATABASE_URL, schema)
    with psycopg.connect(BASE_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_applies_everything_once_and_records_it(empty_schema):
    versions = [m.version for m in discover()]
    assert migrate(empty_schema) == versions
    assert migrate(empty_schema) == []
    with psycopg.connect(empty_schema) as conn:
        recorded = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            )
        }
    assert recorded == versions
    assert {
        "users",
        "screening_results",
        "processed_events",
        "audit_log",
        "notifications",
        "bank_accounts",
        "aisp_reads",
        "transactions",
        "job_outbox",
        "dead_letters",
        "scheduler_fires",
    } <= tables


def test_two_processes_starting_at_once_apply_each_migration_once(empty_schema):
    results, errors = [], []

    def run():
        try:
            results.append(migrate(empty_schema))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    applied = [v for r in results for v in r]
    assert sorted(applied) == [m.version for m in discover()]  # each applied by exactly one runner


def test_an_edited_applied_migration_stops_the_runner(empty_schema, tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id int);")
    migrate(empty_schema, tmp_path)
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id bigint);")
    with pytest.raises(MigrationError, match="0001_a was changed"):
        migrate(empty_schema, tmp_path)


def test_a_failing_migration_leaves_nothing_half_applied(empty_schema, tmp_path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (id int); SELECT * FROM no_such_table;")
    with pytest.raises(psycopg.errors.UndefinedTable):
        migrate(empty_schema, tmp_path)
    with psycopg.connect(empty_schema) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == ["0001_ok"]
        assert conn.execute("SELECT to_regclass('half')").fetchone()[0] is None


def test_constraints_make_effects_exact(sql):
    sql("INSERT INTO users (id) VALUES ('u1')")
    assert sql("SELECT kyc_status FROM users")[0]["kyc_status"] == "not_started"
    with pytest.raises(psycopg.errors.CheckViolation):
        sql("UPDATE users SET kyc_status = 'maybe' WHERE id = 'u1'")
    with pytest.raises(psycopg.errors.CheckViolation):
        sql("UPDATE users SET national_id_hash = '01017012345' WHERE id = 'u1'")  # a raw pid is refused
    sql("INSERT INTO transactions (id, user_id, idempotency_key, amount) VALUES ('t1', 'u1', 'k1', 201000)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql("INSERT INTO transactions (id, user_id, idempotency_key, amount) VALUES ('t2', 'u1', 'k1', 5)")
    with pytest.raises(psycopg.errors.CheckViolation):
        sql("INSERT INTO transactions (id, user_id, idempotency_key, amount) VALUES ('t3', 'u1', 'k3', 0)")
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        sql("INSERT INTO transactions (id, user_id, idempotency_key, amount) VALUES ('t4', 'u1', 'k4', '20.10')")
    row = sql("SELECT status, currency, pg_typeof(amount)::text AS t FROM transactions WHERE id = 't1'")[0]
    assert row == {"status": "processing", "currency": "NOK", "t": "bigint"}
    sql("INSERT INTO processed_events (event_id, consumer_group) VALUES ('e1', 'kyc')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql("INSERT INTO processed_events (event_id, consumer_group) VALUES ('e1', 'kyc')")
    sql("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES ('x', '{}', 'same')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql("INSERT INTO job_outbox (job, payload, idempotency_key) VALUES ('x', '{}', 'same')")
