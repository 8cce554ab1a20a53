"""``EpicsBuffer``: the PVs buffered during a run are written by the DAQ's EPICS writer (through the
REST API) and referenced from the run's documents — checked against the simulated IOC's values."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine

from daq_backend.broker import make_transport
from daq_backend.epics.buffer import BufferConfig
from daq_backend.epics.buffer import EpicsBuffer as PvBuffer
from daq_backend.epics.records import PULSE_ID_STREAM
from daq_backend.epics.service import EpicsWriterService
from daq_backend.epics.sim_ioc import SCALAR_EVERY, SimIocProcess, float_value, int_value, waveform_value
from daq_backend.epics.store import make_store
from daq_backend.epics.writer import read_file
from std_daq_ophyd import EpicsBuffer, EpicsBufferSupplement, epics_buffer_wrapper
from std_daq_ophyd.readback import stream_data
from std_daq_ophyd.sim import EmbeddedDaq
from std_daq_ophyd.testing import Recorder, make_detector

SUFFIXES = ("FLOAT", "INT", "WAVEFORM", "STRING")


@pytest.fixture(scope="module")
def ioc() -> Iterator[SimIocProcess]:
    with SimIocProcess(prefix=f"T{uuid.uuid4().hex[:8]}:", pulse_rate=100) as process:
        with pytest.MonkeyPatch.context() as env:
            for name, value in process.client_env.items():
                env.setenv(name, value)
            yield process


@pytest.fixture(scope="module")
def epics_side(ioc: SimIocProcess, daq: EmbeddedDaq) -> Iterator[None]:
    """The DAQ's EPICS part: buffer (PVs -> embedded Redis) and EPICS writer on the DAQ's broker."""
    store = make_store("embedded")
    config = BufferConfig(pulse_id_pv=ioc.pv("PULSE_ID"), pv_list=[ioc.pv(s) for s in SUFFIXES])
    buffer = PvBuffer(config, store)
    buffer.start()
    transport = make_transport(daq.transport_url)
    service = EpicsWriterService(transport, store)
    service.start()
    try:
        deadline = time.monotonic() + 120
        while not store.redis.xlen(PULSE_ID_STREAM):
            assert time.monotonic() < deadline, "no pulse id reached the buffer"
            time.sleep(0.1)
        yield
    finally:
        service.stop()
        transport.close()
        buffer.stop()
        store.close()


def make_buffer(ioc: SimIocProcess, daq: EmbeddedDaq, data_dir: Path) -> EpicsBuffer:
    return EpicsBuffer(name="epics", url=daq.url, channels=[ioc.pv(s) for s in SUFFIXES],
                       pulse_id_pv=ioc.pv("PULSE_ID"), output_dir=str(data_dir))


def check_epics_stream(recorder: Recorder, ioc: SimIocProcess) -> None:
    assert recorder.invalid == []
    assert recorder.of("stop")[0]["exit_status"] == "success"
    descriptor, = [d for d in recorder.of("descriptor") if d["name"] == "epics_buffer"]
    event, = [e for e in recorder.of("event") if e["descriptor"] == descriptor["uid"]]
    start, stop = event["data"]["epics_start_pulse_id"], event["data"]["epics_stop_pulse_id"]
    assert 0 < start < stop
    path = event["data"]["epics_file_name"]
    content = read_file(path)
    keys = descriptor["data_keys"]
    prefix = "epics_" + ioc.prefix.rstrip(":")
    numeric = {f"{prefix}_{s}": ioc.pv(s) for s in ("FLOAT", "INT", "WAVEFORM")}
    for key, pv in numeric.items():
        assert keys[key]["external"] == "STREAM:"
        values = stream_data(recorder.docs, key, stream="epics_buffer")[0]
        np.testing.assert_array_equal(values, content[pv]["data"])  # the documents find the file's data
        pulses = [int(p) for p in content[pv]["pulse_id"]]
        # the run's updates: the last at/before its start, those during it, and at most one after its
        # end (if it was buffered when the file was written); the IOC updates every SCALAR_EVERY pulses
        assert pulses == sorted(set(pulses)) and all(p % SCALAR_EVERY == 0 for p in pulses), pulses
        assert pulses[0] <= start and sum(p > stop for p in pulses) <= 1, (start, stop, pulses)
        assert any(start < p <= stop for p in pulses), (start, stop, pulses)
        expected = {"FLOAT": float_value, "INT": int_value, "WAVEFORM": waveform_value}[pv.rsplit(":", 1)[1]]
        np.testing.assert_array_equal(values, np.array([expected(int(p)) for p in pulses]))
    assert f"{prefix}_STRING" not in keys  # text stays in the file, named by epics_file_name
    assert list(content[ioc.pv("STRING")]["data"])


def test_epics_stream_at_the_end_of_a_run(RE: RunEngine, recorder: Recorder, daq: EmbeddedDaq,
                                          data_dir: Path, ioc: SimIocProcess, epics_side: None) -> None:
    det = make_detector(daq, data_dir, frames=2)
    epics = make_buffer(ioc, daq, data_dir)
    RE(epics_buffer_wrapper(bp.count([det], 3, delay=0.2), [epics]))
    check_epics_stream(recorder, ioc)
    assert [d["name"] for d in recorder.of("descriptor")] == ["primary", "epics_buffer"]
    assert len(recorder.of("event")) == 4


def test_epics_supplement_for_every_run(recorder: Recorder, daq: EmbeddedDaq, data_dir: Path,
                                        ioc: SimIocProcess, epics_side: None) -> None:
    engine = RunEngine({})
    engine.subscribe(recorder)
    engine.preprocessors.append(EpicsBufferSupplement([make_buffer(ioc, daq, data_dir)]))
    engine(bp.count([make_detector(daq, data_dir, frames=1)], 2, delay=0.2))
    check_epics_stream(recorder, ioc)


def test_epics_buffer_refuses_to_stage_without_channels(daq: EmbeddedDaq, data_dir: Path) -> None:
    epics = EpicsBuffer(name="epics", url=daq.url, pulse_id_pv="X:PULSE_ID", output_dir=str(data_dir),
                        pulse_id_source=lambda: 1)
    with pytest.raises(ValueError, match="epics: no channels configured"):
        epics.stage()
