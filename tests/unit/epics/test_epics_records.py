"""EPICS buffer building blocks: stream record format, line protocol, config validation, stores."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from daq_backend.epics.buffer import BufferConfig, load_config
from daq_backend.epics.records import (
    Event,
    decode_record,
    encode_state,
    encode_update,
    entry_ms,
)
from daq_backend.epics.stats import format_line
from daq_backend.epics.store import EmbeddedRedisServer, make_store

REAL_REDIS = "redis://127.0.0.1:6379"


def _roundtrip(fields: dict) -> dict[bytes, bytes]:
    """What the fields look like after a trip through Redis (all values bytes)."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


@pytest.mark.parametrize("dtype", [">f8", ">f4", ">i4", ">i2", ">u2", "|u1", "|i1"])
def test_numeric_scalars_roundtrip_with_dtype(dtype: str) -> None:
    data = np.array([7], dtype=dtype)
    fields = encode_update(data, scalar=True, timestamp_ns=123, status="HIHI", severity="MAJOR")
    record = decode_record(_roundtrip(fields))
    assert record.event is Event.UPDATE
    assert record.shape == ()
    assert record.value.shape == ()
    assert record.value.dtype == np.dtype(dtype).newbyteorder("<")
    assert record.value == 7
    assert (record.timestamp_ns, record.status, record.severity, record.connected) == (
        123,
        "HIHI",
        "MAJOR",
        True,
    )


def test_waveform_roundtrips_values_dtype_and_shape() -> None:
    data = (np.arange(100) / 8).astype(">f8")
    record = decode_record(
        _roundtrip(encode_update(data, scalar=False, timestamp_ns=1, status="", severity=""))
    )
    assert record.dtype == "<f8"
    assert record.shape == (100,)
    np.testing.assert_array_equal(record.value, np.arange(100) / 8)


def test_one_element_waveform_stays_an_array() -> None:
    record = decode_record(
        _roundtrip(encode_update(np.array([3], ">i4"), scalar=False, timestamp_ns=1, status="", severity=""))
    )
    assert record.shape == (1,)
    assert record.value.tolist() == [3]


def test_strings_roundtrip_as_text() -> None:
    scalar = decode_record(
        _roundtrip(
            encode_update(
                [b"pulse 12\x00junk"], scalar=True, timestamp_ns=1, status="NO_ALARM", severity="NO_ALARM"
            )
        )
    )
    assert (scalar.dtype, scalar.shape, scalar.value) == ("string", (), "pulse 12")
    array = decode_record(
        _roundtrip(
            encode_update(
                [b"a", "b\u00e9", b"\xe9t\xe9"], scalar=False, timestamp_ns=1, status="", severity=""
            )
        )
    )
    assert (array.dtype, array.shape, array.value) == ("string", (3,), ["a", "b\u00e9", "\u00e9t\u00e9"])


def test_connection_state_records() -> None:
    down = decode_record(_roundtrip(encode_state(False, 99)))
    up = decode_record(_roundtrip(encode_state(True, 100)))
    assert (down.event, down.connected, down.value, down.timestamp_ns) == (Event.DISCONNECT, False, None, 99)
    assert (up.event, up.connected, up.value) == (Event.CONNECT, True, None)


def test_entry_ms() -> None:
    assert entry_ms(b"1795643422868-3") == 1795643422868
    assert entry_ms("0-1") == 0


# InfluxDB line protocol: measurement(,tag=value)* field=value(,field=value)* timestamp
_KEY = r"(?:[^,= \\]|\\.)+"
_FIELD_VALUE = r'(?:-?\d+i|-?\d+(?:\.\d+)?(?:e[+-]?\d+)?|true|false|"(?:[^"\\]|\\.)*")'
LINE = re.compile(
    rf"^(?:[^, \\]|\\.)+(?:,{_KEY}={_KEY})* {_KEY}={_FIELD_VALUE}(?:,{_KEY}={_FIELD_VALUE})* \d+$"
)


def test_stats_line_is_valid_line_protocol() -> None:
    line = format_line(
        "epics_buffer",
        {"service_name": "buf 1,a=b"},
        {"n_events": 12, "n_bytes": 3400, "throughput_bytes": 340.5, "redis_connected": True},
        1_700_000_000_000_000_000,
    )
    assert line == (
        r"epics_buffer,service_name=buf\ 1\,a\=b "
        "n_events=12i,n_bytes=3400i,throughput_bytes=340.5,redis_connected=true 1700000000000000000"
    )
    assert LINE.match(line)
    # The seed's space-separated fields would not parse.
    assert not LINE.match("epics_buffer,service_name=x n_events=1i n_bytes=2i 17")


def test_line_protocol_rejects_what_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="at least one field"):
        format_line("m", {}, {}, 1)
    with pytest.raises(ValueError, match="nan"):
        format_line("m", {}, {"x": float("nan")}, 1)


def test_buffer_config_defaults_and_errors(tmp_path: Path) -> None:
    config = BufferConfig(pulse_id_pv="X:PULSE_ID", pv_list=["X:A"])
    assert (config.maxlen, config.pulse_id_maxlen, config.stream_prefix) == (864_000, 8_640_000, "")
    path = tmp_path / "buffer.json"
    path.write_text(json.dumps({"pulse_id_pv": "X:P", "pv_list": ["X:A", "X:A"], "maxlen": 0, "typo": 1}))
    with pytest.raises(ValueError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message
    for expected in ("pv_list", "duplicate PV names ['X:A']", "maxlen", "typo"):
        assert expected in message
    path.write_text("{not json")
    with pytest.raises(ValueError, match="buffer.json"):
        load_config(path)
    with pytest.raises(ValueError, match="pulse_id_pv"):
        BufferConfig.model_validate({"pv_list": []})


def _exercise(store_url: str) -> None:
    """Both store kinds serve the stream commands the buffer and writer use, through one client path."""
    key = f"test_epics_store:{uuid.uuid4().hex}"
    with make_store(store_url) as store:
        try:
            r = store.redis
            assert store.ping()
            assert r.xadd(key, {"a": 1}, id="5-*") == b"5-0"
            assert r.xadd(key, {"a": 2}, id="5-*", maxlen=10, approximate=True) == b"5-1"
            with pytest.raises(redis.ResponseError, match="equal or smaller"):
                r.xadd(key, {"a": 3}, id="4-*")
            assert [e[0] for e in r.xrevrange(key, max="5", min="-", count=1)] == [b"5-1"]
            assert [e[0] for e in r.xrange(key, min="(5-0", max="+")] == [b"5-1"]
        finally:
            store.redis.delete(key)


def test_real_redis_store() -> None:
    _exercise(REAL_REDIS)


def test_embedded_store_needs_no_server() -> None:
    _exercise("embedded")


def test_make_store_default_honours_redis_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "127.0.0.1")
    with make_store(None) as store:
        assert store.embedded is None
        assert store.url == REAL_REDIS
        assert store.ping()
    for value in ("127.0.0.1:6379", REAL_REDIS):
        monkeypatch.setenv("REDIS_HOST", value)
        with make_store(None) as store:
            assert store.url == REAL_REDIS
    monkeypatch.setenv("REDIS_HOST", "embedded")
    with make_store(None) as store:
        assert store.embedded is not None
    monkeypatch.delenv("REDIS_HOST")
    with make_store(None) as store:
        assert store.embedded is not None
        assert store.ping()
        # Another client (another process) reaches the embedded store through its URL.
        other = redis.Redis.from_url(store.url)
        store.redis.set("k", "v")
        assert other.get("k") == b"v"
        other.close()
    assert not store.ping()


def test_embedded_store_on_a_chosen_port() -> None:
    port = EmbeddedRedisServer()
    chosen = port.port
    port.stop()  # a port known to be free
    with make_store(f"embedded://127.0.0.1:{chosen}") as store:
        assert store.url == f"redis://127.0.0.1:{chosen}"
        assert redis.Redis(port=chosen).ping()


def test_make_store_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="redis_url"):
        make_store("http://127.0.0.1:6379")


def test_embedded_server_restart_keeps_data_with_shared_backend() -> None:
    first = EmbeddedRedisServer()
    client = redis.Redis(host=first.host, port=first.port, socket_timeout=5)
    client.set("k", "v")
    first.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=first.host, port=first.port, socket_connect_timeout=2).ping()
    second = EmbeddedRedisServer(port=first.port, backend=first.backend)
    try:
        assert redis.Redis(host=second.host, port=second.port).get("k") == b"v"
    finally:
        second.stop()
        client.close()
