"""REDIS_URL may name a Sentinel-managed primary (issue 17 item 2)."""

import pytest

from worker.redis_client import SentinelTarget, parse_sentinel_url, redis_from_url
from worker.settings import Settings


def test_a_sentinel_url_names_every_sentinel_the_service_the_db_and_the_passwords():
    assert parse_sentinel_url("redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380/drop/3"
                              "?sentinel_password=sp") == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380)), service="drop", db=3, password="s@cret",
        sentinel_password="sp")
    assert parse_sentinel_url("redis+sentinel://sentinel-a:26379/drop") == SentinelTarget(
        sentinels=(("sentinel-a", 26379),), service="drop", db=0, password=None, sentinel_password=None)


@pytest.mark.parametrize("url, why", [
    ("redis+sentinel://h1:26379", "/service_name"),
    ("redis+sentinel://h1/drop", "host:port"),
    ("redis+sentinel://h1:26379,h2/drop", "host:port"),
    ("redis+sentinel://h1:26379/drop/x", "integer"),
])
def test_a_malformed_sentinel_url_is_refused_naming_the_part(url, why):
    with pytest.raises(ValueError, match=why):
        parse_sentinel_url(url)


def test_settings_accept_a_sentinel_url_and_a_client_is_built_without_connecting():
    settings = Settings(REDIS_URL="redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/drop/1")
    client = redis_from_url(settings.redis_url, socket_timeout=1)
    pool = client.connection_pool
    assert pool.service_name == "drop" and pool.connection_kwargs["db"] == 1
    assert pool.connection_kwargs["password"] == "pw"
    with pytest.raises(ValueError, match="redis\\+sentinel://"):
        Settings(REDIS_URL="memcached://h:1")
