"""Every PostgreSQL connection has bounded waits (issue 17 item 3)."""

import psycopg
import pytest

from db.pool import close_pool, connection_options, transaction
from worker.settings import get_settings


def test_pooled_connections_carry_a_statement_timeout_keepalives_and_keep_the_urls_own_options(db):
    with transaction() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()["statement_timeout"] == "30s"
        given = conn.info.get_parameters()
        assert (given["connect_timeout"], given["keepalives"], given["keepalives_idle"]) == ("5", "1", "10")
        # the test's own schema (set by the URL's options) is still in force beside the timeout
        assert conn.execute("SHOW search_path").fetchone()["search_path"].startswith("test_")
    options = connection_options("postgresql://h1,h2/db?target_session_attrs=read-write&options=-c%20work_mem%3D8MB")
    assert options["keepalives"] == 1 and options["connect_timeout"] == 5
    assert options["options"] == ("-c work_mem=8MB -c statement_timeout=30000 -c tcp_keepalives_idle=5 "
                                  "-c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 "
                                  "-c idle_in_transaction_session_timeout=120000")
    assert "connect_timeout" not in connection_options("postgresql://h/db?connect_timeout=2")


def test_a_statement_past_the_timeout_is_cancelled(db, monkeypatch):
    monkeypatch.setenv("DROP_DB_STATEMENT_TIMEOUT_MS", "200")
    get_settings.cache_clear()
    close_pool()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled), transaction() as conn:
            conn.execute("SELECT pg_sleep(2)")
    finally:
        close_pool()
        get_settings.cache_clear()
