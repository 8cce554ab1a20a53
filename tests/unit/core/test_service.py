"""Service-container conventions against real Redis (127.0.0.1:6379) and the embedded fakeredis."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

from daq_backend.service import (
    HEARTBEAT_EXPIRY,
    HEARTBEAT_INTERVAL,
    Heartbeat,
    ServiceConfigError,
    ServiceEnv,
    broker_url_from_host,
    config_key,
    connect_redis,
    default_service_setup,
    load_service_config,
    setup_service,
    status_key,
)
from daq_backend.testing import wait_for

REAL_REDIS = "127.0.0.1:6379"


@pytest.fixture(params=[pytest.param("real", marks=pytest.mark.redis), "embedded"])
def redis_client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "real":
        client = connect_redis(REAL_REDIS)
        assert client.ping()
    else:
        client = connect_redis(None)
    yield client
    client.close()


@pytest.fixture
def name(redis_client: redis.Redis) -> Iterator[str]:
    service_name = f"test.{uuid.uuid4().hex}"
    yield service_name
    redis_client.delete(config_key(service_name), status_key(service_name))


def test_seed_defaults_are_the_documented_ones() -> None:
    assert HEARTBEAT_INTERVAL == 10.0 and HEARTBEAT_EXPIRY == 15
    assert config_key("debug.epics_buffer") == "config.debug.epics_buffer"
    assert status_key("debug.epics_buffer") == "status.debug.epics_buffer"


def test_environment_is_read_as_the_container_sets_it() -> None:
    env = ServiceEnv.from_environ(
        {
            "SERVICE_NAME": "debug.writer",
            "REDIS_HOST": "10.1.2.3",
            "REDIS_SKIP": "True",
            "BROKER_HOST": "broker1",
        }
    )
    assert env == ServiceEnv("debug.writer", "10.1.2.3", True, "broker1")
    assert env.broker_url == "amqp://guest:guest@broker1:5672/%2F"
    assert ServiceEnv.from_environ({}) == ServiceEnv(None, None, False, None)
    assert ServiceEnv.from_environ({"REDIS_SKIP": "false"}).redis_skip is False
    assert broker_url_from_host(None) is None
    assert broker_url_from_host("embedded") is None
    assert broker_url_from_host("amqp://u:p@h:1/v") == "amqp://u:p@h:1/v"
    assert broker_url_from_host("h:5673") == "amqp://guest:guest@h:5673/%2F"


@pytest.mark.redis
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:6379", "redis://127.0.0.1:6379/0"])
def test_connect_real_redis_spellings(host: str) -> None:
    client = connect_redis(host)
    try:
        assert client.ping()
    finally:
        client.close()


def test_embedded_redis_is_shared_within_the_process() -> None:
    a, b = connect_redis(None), connect_redis("embedded")
    assert isinstance(a, fakeredis.FakeRedis)
    key = f"k.{uuid.uuid4().hex}"
    a.set(key, "v")
    assert b.get(key) == "v"
    a.delete(key)


def test_bad_redis_port_is_named() -> None:
    with pytest.raises(ServiceConfigError, match="port 'abc'"):
        connect_redis("localhost:abc")


def test_config_from_file_wins(tmp_path: Path, redis_client: redis.Redis, name: str) -> None:
    redis_client.set(config_key(name), json.dumps({"from": "redis"}))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"from": "file", "n": 3}))
    assert load_service_config(name, path, redis_client) == {"from": "file", "n": 3}


def test_config_from_redis_key_when_file_absent(tmp_path: Path, redis_client: redis.Redis, name: str) -> None:
    redis_client.set(config_key(name), json.dumps({"pv_list": ["a", "b"]}))
    assert load_service_config(name, tmp_path / "absent.json", redis_client) == {"pv_list": ["a", "b"]}
    assert load_service_config(name, None, redis_client) == {"pv_list": ["a", "b"]}


def test_missing_redis_key_gives_empty_config(tmp_path: Path, redis_client: redis.Redis, name: str) -> None:
    assert load_service_config(name, tmp_path / "absent.json", redis_client) == {}


@pytest.mark.parametrize("content", [b"", b"{"])
def test_file_of_at_most_one_byte_aborts(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ServiceConfigError, match=rf"{len(content)} byte\(s\)"):
        load_service_config("svc", path, connect_redis(None))


@pytest.mark.parametrize(
    ("text", "message"), [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")]
)
def test_bad_config_content_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ServiceConfigError, match=message):
        load_service_config("svc", path, None)


def test_bad_json_in_redis_key_names_the_key(redis_client: redis.Redis, name: str) -> None:
    redis_client.set(config_key(name), "{oops")
    with pytest.raises(ServiceConfigError, match=f"Redis key config.{name}: not valid JSON"):
        load_service_config(name, None, redis_client)


def test_redis_skipped_and_no_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ServiceConfigError, match="REDIS_SKIP"):
        load_service_config("svc", tmp_path / "absent.json", None)


def test_heartbeat_publishes_config_with_expiry(redis_client: redis.Redis, name: str) -> None:
    heartbeat = Heartbeat(redis_client, name, json.dumps({"a": 1})).start()
    try:
        assert redis_client.hgetall(status_key(name)) == {"config": '{"a": 1}'}
        assert 0 < redis_client.ttl(status_key(name)) <= 15
    finally:
        heartbeat.stop()
    # the seed lets the hash expire; it is not deleted on stop
    assert redis_client.exists(status_key(name))


def test_heartbeat_refreshes_expiry_and_lapses_after_stop(redis_client: redis.Redis, name: str) -> None:
    heartbeat = Heartbeat(redis_client, name, "{}", interval=0.1, expiry=1).start()
    key = status_key(name)
    try:
        redis_client.persist(key)  # drop the TTL: only a later beat can set it again
        assert redis_client.ttl(key) == -1
        wait_for(lambda: redis_client.ttl(key) > 0, "heartbeat to restore the expiry")
        beats = heartbeat.n_beats
        wait_for(lambda: heartbeat.n_beats >= beats + 3, "three more beats")
        assert redis_client.exists(key)
    finally:
        heartbeat.stop()
    wait_for(lambda: not redis_client.exists(key), "status hash to expire after the heartbeat stopped")


def test_heartbeat_stop_can_clear(redis_client: redis.Redis, name: str) -> None:
    with Heartbeat(redis_client, name, "{}", interval=5, expiry=15) as heartbeat:
        assert redis_client.exists(status_key(name))
    heartbeat.stop(clear=True)
    assert not redis_client.exists(status_key(name))


def test_heartbeat_rejects_interval_not_below_expiry() -> None:
    with pytest.raises(ValueError, match="below the expiry"):
        Heartbeat(connect_redis(None), "x", "{}", interval=15, expiry=15)


def test_heartbeat_survives_a_failing_redis(name: str) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server, decode_responses=True)
    heartbeat = Heartbeat(client, name, "{}", interval=0.05, expiry=1).start()
    try:
        server.connected = False
        time.sleep(0.3)  # let a few beats fail
        assert heartbeat._thread is not None and heartbeat._thread.is_alive()
        server.connected = True
        beats = heartbeat.n_beats
        wait_for(lambda: heartbeat.n_beats > beats, "beats after Redis came back")
    finally:
        heartbeat.stop()


@pytest.mark.redis
def test_setup_service_against_real_redis(tmp_path: Path) -> None:
    service_name = f"test.{uuid.uuid4().hex}"
    client = connect_redis(REAL_REDIS)
    client.set(config_key(service_name), json.dumps({"detector_name": "eiger"}))
    parser = argparse.ArgumentParser()
    parser.add_argument("tag")
    service = setup_service(
        parser,
        ["eiger", "--json_config_file", str(tmp_path / "absent.json"), "--broker-url", "amqp://h"],
        environ={"SERVICE_NAME": service_name, "REDIS_HOST": REAL_REDIS},
        heartbeat_interval=0.1,
        heartbeat_expiry=2,
    )
    try:
        assert service.name == service_name
        assert service.config == {"detector_name": "eiger"}
        assert service.args.tag == "eiger" and service.args.broker_url == "amqp://h"
        assert json.loads(client.hget(status_key(service_name), "config")) == {"detector_name": "eiger"}
        assert 0 < client.ttl(status_key(service_name)) <= 2
    finally:
        service.close(clear_status=True)
        client.delete(config_key(service_name))
    assert not client.exists(status_key(service_name))


def test_default_service_setup_has_the_seed_signature(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"x": 1}))
    parser = argparse.ArgumentParser()
    name, config, args = default_service_setup(
        parser,
        ["--json_config_file", str(path), "--log_level", "DEBUG"],
        environ={"REDIS_SKIP": "true", "BROKER_HOST": "127.0.0.1"},
    )
    assert uuid.UUID(name)  # no SERVICE_NAME: a random uuid
    assert config == {"x": 1}
    assert args.log_level == "DEBUG"
    assert args.broker_url == "amqp://guest:guest@127.0.0.1:5672/%2F"


def test_setup_service_embedded_default_needs_no_server(tmp_path: Path) -> None:
    service_name = f"test.{uuid.uuid4().hex}"
    embedded = connect_redis(None)
    embedded.set(config_key(service_name), '{"k": "v"}')
    service = setup_service(
        argparse.ArgumentParser(),
        ["--service_name", service_name, "--json_config_file", str(tmp_path / "none.json")],
        environ={},
    )
    try:
        assert service.config == {"k": "v"}
        assert embedded.hget(status_key(service_name), "config") == '{"k": "v"}'
        assert service.args.broker_url is None
    finally:
        service.close(clear_status=True)
        embedded.delete(config_key(service_name))


def test_log_level_choices_are_enforced() -> None:
    with pytest.raises(SystemExit):
        setup_service(argparse.ArgumentParser(), ["--log_level", "LOUD"], environ={"REDIS_SKIP": "1"})
