"""EPICS buffer end to end: simulated caproto IOC (subprocess) -> buffer -> Redis -> writer -> HDF5.

The IOC's values are pure functions of the pulse id and carry the pulse's EPICS timestamp
(``daq_backend.epics.sim_ioc``), so the expected rows of a write request are computed here from
the pulse ids alone.
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daq_backend.epics import sim_ioc
from daq_backend.epics.buffer import BufferConfig, EpicsBuffer
from daq_backend.epics.records import PULSE_ID_STREAM, Event, decode_record, entry_ms
from daq_backend.epics.sim_ioc import SimIocProcess
from daq_backend.epics.store import EmbeddedRedisServer, Store, make_store
from daq_backend.epics.writer import EpicsWriter, WriterSettings, read_file
from daq_backend.testing import wait_for

REAL_REDIS = "redis://127.0.0.1:6379"
PVS = ("FLOAT", "INT", "WAVEFORM", "STRING")
LINE = re.compile(r"^epics_buffer,service_name=\S+ (\w+=[^, ]+)(,\w+=[^, ]+)* \d+$")


@pytest.fixture(scope="module")
def ioc() -> Iterator[SimIocProcess]:
    with SimIocProcess(prefix=f"T{uuid.uuid4().hex[:8]}:", pulse_rate=100) as process:
        with pytest.MonkeyPatch.context() as env:
            for name, value in process.client_env.items():
                env.setenv(name, value)
            yield process


def _cleanup(store: Store, prefix: str) -> None:
    keys = list(store.redis.scan_iter(match=prefix + "*"))
    if keys:
        store.redis.delete(*keys)


@dataclass
class Running:
    buffer: EpicsBuffer
    store: Store
    prefix: str

    def pulses(self) -> list[tuple[int, int]]:
        return [
            (entry_ms(i), int(f[b"timestamp"]))
            for i, f in self.store.redis.xrange(self.prefix + PULSE_ID_STREAM)
        ]

    def newest_pulse(self) -> int:
        newest = self.store.redis.xrevrange(self.prefix + PULSE_ID_STREAM, count=1)
        return entry_ms(newest[0][0]) if newest else 0

    def entries(self, ioc: SimIocProcess, suffix: str) -> list:
        return [decode_record(f) for _, f in self.store.redis.xrange(self.prefix + ioc.pv(suffix))]

    def writer(self, **settings: Any) -> EpicsWriter:
        return EpicsWriter(self.store, WriterSettings(stream_prefix=self.prefix, **settings))


def start_buffer(ioc: SimIocProcess, store: Store, stats_file: Path | None = None, **config: Any) -> Running:
    prefix = config.pop("stream_prefix", f"test_epics_buffer:{uuid.uuid4().hex}:")
    buffer = EpicsBuffer(
        BufferConfig(
            pulse_id_pv=ioc.pv("PULSE_ID"), pv_list=[ioc.pv(s) for s in PVS], stream_prefix=prefix, **config
        ),
        store,
        service_name=f"test-{uuid.uuid4().hex[:8]}",
        stats_file=stats_file,
    )
    buffer.start()
    return Running(buffer, store, prefix)


@pytest.fixture(scope="module")
def recorded(ioc: SimIocProcess) -> Iterator[tuple[Running, int]]:
    """A buffer that has recorded 10 s of 100 Hz pulse ids (plus whatever the later tests add)."""
    with make_store(REAL_REDIS) as store:
        running = start_buffer(ioc, store)
        try:
            wait_for(running.newest_pulse, "the first pulse id in Redis", 120)
            first = running.pulses()[0][0]
            wait_for(lambda: running.newest_pulse() >= first + 1000, "10 s of pulse ids", 300)
            yield running, first
        finally:
            running.buffer.stop()
            _cleanup(store, running.prefix)


def expected_updates(start: int, stop: int, every: int) -> list[int]:
    """Pulses of the rows for a PV updated on every ``every``-th pulse: last at/before start, all
    between, first at/after stop."""
    before = start - start % every
    after = stop + (-stop) % every
    return [before, *[q for q in range(before + every, after, every) if start < q < stop], after]


def check_exact(running: Running, ioc: SimIocProcess, start: int, stop: int, tmp_path: Path) -> None:
    pulses = dict(running.pulses())
    window = range(start - 60, stop + 60)
    missing = [p for p in window if p not in pulses]
    assert not missing, f"the buffer lost pulse ids {missing[:10]} (IOC lagging?)"
    body = {
        "start_pulse_id": start,
        "stop_pulse_id": stop,
        "channels": [ioc.pv(s) for s in PVS],
        "output_file": str(tmp_path / f"{start}.h5"),
        "metadata": {"pulse_range": [start, stop]},
    }
    summary = running.writer().write(body)
    assert (summary["start_pulse_id_buffered"], summary["stop_pulse_id_buffered"]) == (start, stop)
    content = read_file(body["output_file"])
    for suffix, every, value in [
        ("FLOAT", sim_ioc.SCALAR_EVERY, sim_ioc.float_value),
        ("INT", sim_ioc.SCALAR_EVERY, sim_ioc.int_value),
        ("WAVEFORM", sim_ioc.SCALAR_EVERY, sim_ioc.waveform_value),
        ("STRING", sim_ioc.STRING_EVERY, sim_ioc.string_value),
    ]:
        rows = expected_updates(start, stop, every)
        channel = content[ioc.pv(suffix)]
        assert channel["pulse_id"].tolist() == rows, suffix
        assert channel["timestamp_ns"].tolist() == [pulses[q] for q in rows], suffix
        assert channel["connected"].tolist() == [1] * len(rows)
        assert channel["status"].tolist() == ["NO_ALARM"] * len(rows)
        expected = [value(q) for q in rows]
        if suffix == "STRING":
            assert channel["data"].tolist() == expected
        else:
            np.testing.assert_array_equal(channel["data"], np.array(expected))
    assert content[ioc.pv("FLOAT")]["data"].dtype == np.dtype("<f8")
    assert content[ioc.pv("INT")]["data"].dtype == np.dtype("<i4")
    assert content[ioc.pv("WAVEFORM")]["data"].shape[1:] == (sim_ioc.WAVEFORM_LENGTH,)
    assert content[ioc.pv("STRING")]["attrs"]["dtype"] == "string"


def test_exact_values_unaligned_range(
    recorded: tuple[Running, int], ioc: SimIocProcess, tmp_path: Path
) -> None:
    running, first = recorded
    base = first + 200 + (-first) % 50
    check_exact(running, ioc, base + 3, base + 407, tmp_path)


def test_exact_values_range_on_update_pulses(
    recorded: tuple[Running, int], ioc: SimIocProcess, tmp_path: Path
) -> None:
    """Every PV updates exactly on start and stop: the start update is 'at/before', the stop 'at/after'."""
    running, first = recorded
    base = first + 200 + (-first) % 50
    check_exact(running, ioc, base + 100, base + 600, tmp_path)


def test_ten_seconds_recorded_without_loss(recorded: tuple[Running, int], ioc: SimIocProcess) -> None:
    running, first = recorded
    ids = [p for p, _ in running.pulses() if p <= first + 1000]
    assert ids == list(range(first, first + 1001))
    times = [t for p, t in running.pulses() if p <= first + 1000]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    floats = [e for e in running.entries(ioc, "FLOAT") if e.event is Event.UPDATE]
    assert len(floats) >= 100
    assert running.buffer.counters.snapshot()["n_dropped"] == 0


def test_ioc_restart_is_recorded_as_disconnect_and_reconnect(
    recorded: tuple[Running, int], ioc: SimIocProcess, tmp_path: Path
) -> None:
    running, _ = recorded
    last_before = running.newest_pulse()
    ioc.stop()
    for suffix in PVS:
        wait_for(
            lambda s=suffix: running.entries(ioc, s)[-1].event is Event.DISCONNECT, f"{suffix} down", 60
        )
    ioc.start()
    for suffix in PVS:

        def reconnected(s: str = suffix) -> bool:
            events = [e.event for e in running.entries(ioc, s)]
            tail = events[events.index(Event.DISCONNECT) :]
            return tail[:2] == [Event.DISCONNECT, Event.CONNECT] and Event.UPDATE in tail

        wait_for(reconnected, f"{suffix} reconnected", 120)
    first_after = wait_for(
        lambda: next((p for p, _ in running.pulses() if p > last_before), None), "new pulse ids", 60
    )
    wait_for(lambda: running.newest_pulse() >= first_after + 60, "pulse ids after the restart", 60)
    body = {
        "start_pulse_id": last_before - 50,
        "stop_pulse_id": first_after + 50,
        "channels": [ioc.pv(s) for s in PVS],
        "output_file": str(tmp_path / "restart.h5"),
    }
    running.writer().write(body)
    content = read_file(body["output_file"])
    for suffix in PVS:
        channel = content[ioc.pv(suffix)]
        connected = channel["connected"].tolist()
        assert connected.count(0) == 1, suffix
        down = connected.index(0)
        assert 0 < down < len(connected) - 1 and connected[down + 1] == 1, suffix
        assert channel["status"][down] == ""
        assert channel["pulse_id"][down] >= last_before - 1
    floats = content[ioc.pv("FLOAT")]
    assert math.isnan(floats["data"][floats["connected"].tolist().index(0)])


def test_redis_outage_is_logged_and_recovered(
    ioc: SimIocProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daq_backend.epics")
    server = EmbeddedRedisServer()
    store = Store(server.url)
    stats = tmp_path / "perf.log"
    running = start_buffer(ioc, store, stats_file=stats, stats_interval_s=0.5)
    restarted: EmbeddedRedisServer | None = None
    try:
        wait_for(lambda: running.newest_pulse() > 0 and running.buffer.sink.redis_ok, "pulse ids", 60)
        first = running.pulses()[0][0]
        server.stop()
        wait_for(lambda: not running.buffer.sink.redis_ok, "the buffer to notice the outage", 60)
        wait_for(lambda: running.buffer.sink.backlog > 200, "events piling up in memory", 60)
        assert any("unreachable" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        restarted = EmbeddedRedisServer(port=server.port, backend=server.backend)
        wait_for(lambda: running.buffer.sink.redis_ok and running.buffer.sink.backlog == 0, "recovery", 120)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        newest = running.newest_pulse()
        wait_for(lambda: running.newest_pulse() > newest + 100, "the buffer to keep going", 60)
        ids = [p for p, _ in running.pulses()]
        assert ids == list(range(first, ids[-1] + 1)), "pulse ids lost across the outage"
        assert running.buffer.counters.snapshot()["n_dropped"] == 0
    finally:
        running.buffer.stop()
        store.close()
        (restarted or server).stop()
    lines = stats.read_text().splitlines()
    assert lines and all(LINE.match(line) for line in lines)
    assert any("redis_connected=false" in line and not re.search(r"backlog=0i", line) for line in lines)
    assert sum(int(re.search(r"n_events=(\d+)i", line).group(1)) for line in lines) > 0


def test_embedded_store_end_to_end(
    ioc: SimIocProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_HOST", raising=False)
    with make_store(None) as store:
        assert store.embedded is not None
        running = start_buffer(ioc, store, stream_prefix="")
        try:
            wait_for(running.newest_pulse, "pulse ids", 60)
            first = running.pulses()[0][0]
            wait_for(lambda: running.newest_pulse() >= first + 400, "4 s of pulse ids", 120)
        finally:
            running.buffer.stop()
        assert store.redis.exists(ioc.pv("FLOAT"), PULSE_ID_STREAM) == 2  # the seed's exact stream names
        base = first + 100 + (-first) % 50
        check_exact(running, ioc, base + 7, base + 150, tmp_path)


def test_cli_runs_until_sigterm(ioc: SimIocProcess, tmp_path: Path) -> None:
    prefix = f"test_epics_cli:{uuid.uuid4().hex}:"
    config = tmp_path / "buffer.json"
    config.write_text(
        json.dumps({"pulse_id_pv": ioc.pv("PULSE_ID"), "pv_list": [ioc.pv("FLOAT")], "stream_prefix": prefix})
    )
    command = [sys.executable, "-m", "daq_backend.epics.buffer", str(config), "--redis-url", REAL_REDIS]
    process = subprocess.Popen(command + ["--stats-file", str(tmp_path / "perf.log")])
    with make_store(REAL_REDIS) as store:
        try:
            wait_for(lambda: store.redis.xlen(prefix + PULSE_ID_STREAM) > 50, "the CLI buffering", 120)
            wait_for(lambda: store.redis.xlen(prefix + ioc.pv("FLOAT")) > 2, "FLOAT updates", 60)
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
            assert LINE.match((tmp_path / "perf.log").read_text().splitlines()[-1])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            _cleanup(store, prefix)


def test_bad_config_is_a_clear_cli_error(tmp_path: Path) -> None:
    config = tmp_path / "buffer.json"
    config.write_text(json.dumps({"pulse_id_pv": "X:P", "pv_list": "X:A"}))
    result = subprocess.run(
        [sys.executable, "-m", "daq_backend.epics.buffer", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "pv_list" in result.stderr and str(config) in result.stderr
