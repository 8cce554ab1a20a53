"""EPICS writer on synthetic buffer streams (written through the buffer's own sink into real Redis).

The expected rows come from a plain reference model of the seed's rule — last event at/before the
start time, every event between, first event at/after the stop time — applied to the events fed in.
"""

from __future__ import annotations

import bisect
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daq_backend.broker import BrokerClient, EmbeddedBrokerHub, StatusAggregator, make_transport
from daq_backend.epics.service import EpicsWriterService
from daq_backend.epics.store import make_store
from daq_backend.epics.writer import (
    EpicsRequestError,
    EpicsWriter,
    WriteKilled,
    WriterSettings,
    parse_request,
    read_file,
)
from daq_backend.testing import wait_for
from daq_backend.testing.epics import (
    Buffer,
    Event,
    fill_buffer,
    pulse_time,
)

REAL_REDIS = "redis://127.0.0.1:6379"
@pytest.fixture(scope="module")
def buffer() -> Iterator[Buffer]:
    prefix = f"test_epics_writer:{uuid.uuid4().hex}:"
    with make_store(REAL_REDIS) as store:
        try:
            yield fill_buffer(store, prefix)
        finally:
            keys = list(store.redis.scan_iter(match=prefix + "*"))
            if keys:
                store.redis.delete(*keys)


def expected_rows(series: list[Event], start_ns: int, stop_ns: int) -> list[Event]:
    before = [e for e in series if e.time_ns <= start_ns][-1:]
    between = [e for e in series if start_ns < e.time_ns < stop_ns]
    after = [e for e in series if e.time_ns >= stop_ns][:1]
    return before + between + after


def expected_pulse(buffer: Buffer, time_ns: int) -> int:
    index = bisect.bisect_right(buffer.pulse_times, time_ns) - 1
    return buffer.pulses[index] if index >= 0 else 0


def request(tmp_path: Path, start: int, stop: int, channels: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "start_pulse_id": start,
        "stop_pulse_id": stop,
        "channels": channels,
        "output_file": str(tmp_path / f"{uuid.uuid4().hex}.h5"),
        **extra,
    }


def check_channel(buffer: Buffer, content: dict[str, Any], name: str, start_ns: int, stop_ns: int) -> None:
    rows = expected_rows(buffer.events[name], start_ns, stop_ns)
    assert content["timestamp_ns"].tolist() == [e.time_ns for e in rows]
    np.testing.assert_array_equal(content["timestamp"], np.array([e.time_ns for e in rows]) / 1e9)
    assert content["pulse_id"].tolist() == [expected_pulse(buffer, e.time_ns) for e in rows]
    assert content["connected"].tolist() == [int(e.value is not None) for e in rows]
    assert content["attrs"]["n_points"] == len(rows)
    for row, event in zip(content["data"], rows, strict=True):
        if event.value is None:  # only FLOAT (float64) disconnects here: NaN rows
            assert np.isnan(row).all()
        else:
            np.testing.assert_array_equal(row, event.value)


@pytest.mark.parametrize(
    ("start", "stop"),
    [
        (1450, 1650),  # start/stop between FLOAT updates
        (1400, 1792),  # exactly on FLOAT updates: the update at start is "at/before", at stop "at/after"
        (1001, 1001),  # one pulse: the earliest FLOAT value (bisection far before start for its pulse id)
        (1700, 2500),  # stop maps to pulse 3500 (exactly max_pulse_id_mismatch away): rows past the gap
    ],
)
def test_exact_rows_per_channel(buffer: Buffer, tmp_path: Path, start: int, stop: int) -> None:
    body = request(tmp_path, start, stop, ["FLOAT", "WAVE", "TEXT"], metadata={"scan": 7, "user": "me"})
    summary = buffer.writer().write(body)
    start_pulse = max(p for p in buffer.pulses if p <= start)
    stop_pulse = min(p for p in buffer.pulses if p >= stop)
    start_ns, stop_ns = pulse_time(start_pulse), pulse_time(stop_pulse)
    assert summary["start_pulse_id_buffered"] == start_pulse
    assert summary["stop_pulse_id_buffered"] == stop_pulse
    content = read_file(body["output_file"])
    for name in ("FLOAT", "WAVE", "TEXT"):
        check_channel(buffer, content[name], name, start_ns, stop_ns)
        assert summary["n_points"][name] == content[name]["attrs"]["n_points"]
    assert content["WAVE"]["data"].dtype == np.dtype("<i2")
    assert content["WAVE"]["data"].shape[1:] == (2, 3)
    assert content["FLOAT"]["attrs"]["dtype"] == "<f8"
    assert content["TEXT"]["attrs"]["dtype"] == "string"
    with h5py.File(body["output_file"]) as h5:
        entry = h5["entry"]
        assert entry.attrs["NX_class"] == "NXentry"
        assert (entry.attrs["scan"], entry.attrs["user"]) == (7, "me")
        assert entry.attrs["start_pulse_id"] == start and entry.attrs["stop_pulse_id"] == stop
        assert entry.attrs["start_time"] == start_ns / 1e9
        assert entry["TEXT/data"].dtype == h5py.string_dtype("utf-8")
        assert h5py.check_string_dtype(entry["FLOAT/status"].dtype) is not None
        assert "incomplete" not in entry.attrs


def test_boundary_rows(buffer: Buffer, tmp_path: Path) -> None:
    """Spelled out for one request, so a bug in the reference model cannot hide one in the writer."""
    body = request(tmp_path, 1400, 1407, ["FLOAT"])
    buffer.writer().write(body)
    floats = read_file(body["output_file"])["FLOAT"]
    assert floats["data"].tolist() == [200.0, 201.0]  # the updates at pulses 1400 and 1407
    assert floats["pulse_id"].tolist() == [1400, 1407]
    assert floats["status"].tolist() == ["HIHI", "HIHI"]
    assert floats["severity"].tolist() == ["MAJOR", "MAJOR"]


def test_disconnect_and_out_of_order_rows(buffer: Buffer, tmp_path: Path) -> None:
    disconnect = next(e for e in buffer.events["FLOAT"] if e.value is None)
    pulse = expected_pulse(buffer, disconnect.time_ns)
    body = request(tmp_path, pulse - 20, pulse + 20, ["FLOAT"])
    buffer.writer().write(body)
    floats = read_file(body["output_file"])["FLOAT"]
    assert 0 in floats["connected"].tolist()
    assert np.isnan(floats["data"][floats["connected"].tolist().index(0)])
    # The late re-sent value (time of pulse 1200, indexed at the stream end) comes in arrival order,
    # with its true timestamp and pulse id, and not in a request for the time of pulse 1200.
    body = request(tmp_path, 3550, 3600, ["FLOAT"])
    buffer.writer().write(body)
    floats = read_file(body["output_file"])["FLOAT"]
    assert floats["data"].tolist() == [1799 / 7, -1.0, 99.0]
    assert floats["timestamp_ns"][-1] == pulse_time(1200)
    assert floats["pulse_id"].tolist() == [1799, 3550, 1200]
    body = request(tmp_path, 1195, 1205, ["FLOAT"])
    buffer.writer().write(body)
    assert read_file(body["output_file"])["FLOAT"]["data"].tolist() == [1.5, 200.0]  # not 99.0


def test_varying_shape_and_type(buffer: Buffer, tmp_path: Path) -> None:
    body = request(tmp_path, 1100, 1150, ["VAR", "MIXED"])
    buffer.writer().write(body)
    content = read_file(body["output_file"])
    assert content["VAR"]["data"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
    assert content["VAR"]["data_shape"].tolist() == [[3], [5]]
    assert content["MIXED"]["data"].tolist() == ["2.5", "now text"]
    assert content["MIXED"]["attrs"]["dtype"] == "string"


def test_never_seen_channel_gives_empty_datasets_with_note(buffer: Buffer, tmp_path: Path) -> None:
    body = request(tmp_path, 1100, 1200, ["NEVER", "FLOAT"])
    summary = buffer.writer().write(body)
    content = read_file(body["output_file"])
    assert summary["n_points"]["NEVER"] == 0
    assert "never" in content["NEVER"]["attrs"]["note"]
    for name in ("data", "timestamp", "pulse_id", "connected", "status"):
        assert content["NEVER"][name].shape == (0,)
    assert content["FLOAT"]["attrs"]["n_points"] > 0


def test_kill_between_channels_keeps_what_was_written(buffer: Buffer, tmp_path: Path) -> None:
    killed = threading.Event()
    body = request(tmp_path, 1100, 1200, ["FLOAT", "WAVE", "TEXT"])
    with pytest.raises(WriteKilled, match="1 of 3"):
        buffer.writer().write(body, killed, progress=lambda done, total: killed.set())
    with h5py.File(body["output_file"]) as h5:
        assert list(h5["entry"]) == ["FLOAT"]
        assert "killed after 1 of 3" in h5["entry"].attrs["incomplete"]
        assert h5["entry/FLOAT/data"].shape[0] > 0


def _error(buffer: Buffer, body: dict[str, Any], **settings: Any) -> EpicsRequestError:
    with pytest.raises(EpicsRequestError) as error:
        buffer.writer(**settings).write(body)
    assert isinstance(error.value, ValueError)
    return error.value


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"start_pulse_id": 1300, "stop_pulse_id": 1200}, "stop_pulse_id", "before start_pulse_id 1300"),
        ({"start_pulse_id": -1}, "start_pulse_id", "greater than or equal to 0"),
        ({"start_pulse_id": "1100"}, "start_pulse_id", "integer"),
        ({"channels": []}, "channels", "at least 1"),
        ({"channels": ["FLOAT", "FLOAT"]}, "channels", "duplicates"),
        ({"output_file": "relative.h5"}, "output_file", "not an absolute path"),
        ({"output_file": "{tmp}/nonexistent-folder/x.h5"}, "output_file", "does not exist"),
        ({"output_file": "/proc/1/x.h5"}, "output_file", "is outside the folders this DAQ writes to"),
        ({"output_file": "{tmp}/" + "n" * 300}, "output_file", "may have at most 255 bytes"),
        ({"metadata": {"request": 1}}, "metadata", "reserved"),
        ({"stop_pulseid": 3}, "stop_pulseid", "Extra inputs"),
    ],
)
def test_bad_requests_name_the_field(
    buffer: Buffer, tmp_path: Path, changes: dict, field: str, words: str
) -> None:
    body = {**request(tmp_path, 1100, 1200, ["FLOAT"]), **changes}
    if isinstance(body["output_file"], str):
        body["output_file"] = body["output_file"].replace("{tmp}", str(tmp_path))
    error = _error(buffer, body)
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    assert words in str(error)


def test_missing_field_and_non_object() -> None:
    with pytest.raises(EpicsRequestError, match="^output_file: Field required"):
        parse_request({"start_pulse_id": 1, "stop_pulse_id": 2, "channels": ["A"]})
    with pytest.raises(EpicsRequestError, match="^request: expected a JSON object"):
        parse_request([1, 2])  # type: ignore[arg-type]


def test_output_folder_that_is_a_file(buffer: Buffer, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    error = _error(
        buffer, request(tmp_path, 1100, 1200, ["FLOAT"], output_file=str(tmp_path / "file" / "x.h5"))
    )
    assert error.field == "output_file"


def test_existing_file_needs_overwrite(buffer: Buffer, tmp_path: Path) -> None:
    body = request(tmp_path, 1100, 1200, ["FLOAT"])
    Path(body["output_file"]).write_bytes(b"precious")
    error = _error(buffer, body)
    assert (error.field, "exists" in str(error)) == ("output_file", True)
    assert Path(body["output_file"]).read_bytes() == b"precious"
    error = _error(buffer, {**body, "overwrite": True})  # overwrite replaces only a file of this writer
    assert "overwrite replaces only an HDF5 file this DAQ wrote, and it is not an HDF5 file" in str(error)
    assert Path(body["output_file"]).read_bytes() == b"precious"
    Path(body["output_file"]).unlink()
    buffer.writer().write(body)
    buffer.writer().write({**body, "overwrite": True})
    assert read_file(body["output_file"])["FLOAT"]["attrs"]["n_points"] > 0


def test_unknown_channel(buffer: Buffer, tmp_path: Path) -> None:
    body = request(tmp_path, 1100, 1200, ["FLOAT", "NOT:CONFIGURED"])
    error = _error(buffer, body)
    assert error.field == "channels"
    assert "NOT:CONFIGURED" in str(error) and "FLOAT" not in str(error)
    assert not Path(body["output_file"]).exists()


@pytest.mark.parametrize(
    ("start", "stop", "field", "words"),
    [
        (500, 1100, "start_pulse_id", "before the oldest buffered pulse id 1000"),
        (3000, 3550, "start_pulse_id", "nearest earlier pulse id is 1999, 1001 away"),
        (1100, 2400, "stop_pulse_id", "nearest later pulse id is 3500, 1100 away"),
        (1100, 5000, "stop_pulse_id", "after the newest buffered pulse id 3600"),
    ],
)
def test_pulse_ids_outside_the_buffered_range(
    buffer: Buffer, tmp_path: Path, start: int, stop: int, field: str, words: str
) -> None:
    body = request(tmp_path, start, stop, ["FLOAT"])
    error = _error(buffer, body, stop_wait_s=0.2)
    assert error.field == field
    assert words in str(error)
    assert not Path(body["output_file"]).exists()


def test_mismatch_bound_is_configurable(buffer: Buffer, tmp_path: Path) -> None:
    body = request(tmp_path, 3000, 3550, ["FLOAT"])
    buffer.writer(max_pulse_id_mismatch=2000).write(body)
    assert read_file(body["output_file"])["FLOAT"]["attrs"]["n_points"] > 0


def test_no_pulse_ids_buffered(tmp_path: Path) -> None:
    with make_store(REAL_REDIS) as store:
        writer = EpicsWriter(store, WriterSettings(stream_prefix=f"empty:{uuid.uuid4().hex}:"))
        with pytest.raises(EpicsRequestError, match="^start_pulse_id: no pulse ids are buffered"):
            writer.write(request(tmp_path, 1, 2, ["A"]))


def test_writer_on_the_embedded_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_HOST", raising=False)
    with make_store(None) as store:
        assert store.embedded is not None
        small = fill_buffer(store, "")
        body = request(tmp_path, 1450, 1650, ["FLOAT", "WAVE", "TEXT"])
        small.writer().write(body)
        content = read_file(body["output_file"])
        for name in ("FLOAT", "WAVE", "TEXT"):
            check_channel(small, content[name], name, pulse_time(1450), pulse_time(1650))


def _started(aggregator: StatusAggregator, request_id: str) -> bool:
    try:
        return bool(aggregator.status(request_id)["services"])
    except KeyError:
        return False


@pytest.fixture()
def broker() -> Iterator[tuple[Any, str]]:
    name = f"epics-{uuid.uuid4().hex[:12]}"
    hub = EmbeddedBrokerHub(name)
    hub.start()
    transport = make_transport(f"embedded://{name}")
    try:
        yield transport, name
    finally:
        transport.close()
        hub.stop()


def test_writer_service_on_the_embedded_broker(
    buffer: Buffer, tmp_path: Path, broker: tuple[Any, str]
) -> None:
    transport, name = broker
    tag = f"epics_writer_{name}"
    service = EpicsWriterService(
        transport,
        buffer.store,
        service_name=tag,
        settings=WriterSettings(stream_prefix=buffer.prefix, stop_wait_s=120),
    )
    service.start()
    aggregator = StatusAggregator(transport, tag)
    aggregator.start()
    client = BrokerClient(transport, tag)
    try:
        good = request(tmp_path, 1450, 1650, ["FLOAT", "WAVE"])
        status = aggregator.wait_for_complete(client.request(good), timeout=120)
        assert status["status"] == "request_success"
        reports = status["services"][tag]
        assert [action for action, _ in reports][0] == "request_start"
        assert (
            reports[-1][1]["n_points"]["FLOAT"]
            == read_file(good["output_file"])["FLOAT"]["attrs"]["n_points"]
        )
        assert {"n_written": 2, "n_channels": 2} in [
            msg for action, msg in reports if action == "request_progress"
        ]

        bad = request(tmp_path, 1300, 1200, ["FLOAT"])
        status = aggregator.wait_for_complete(client.request(bad), timeout=120)
        assert status["status"] == "request_fail"
        assert status["services"][tag][-1][1].startswith("stop_pulse_id: ")

        # Killed while waiting for a stop pulse id the buffer has not reached yet.
        waiting = request(tmp_path, 3550, 9000, ["FLOAT"])
        request_id = client.request(waiting)
        assert wait_for(lambda: _started(aggregator, request_id), timeout=60)
        client.kill(request_id)
        status = aggregator.wait_for_complete(request_id, timeout=60)
        assert status["status"] == "request_fail"
        assert "killed" in status["services"][tag][-1][1]
    finally:
        aggregator.stop()
        service.stop()
