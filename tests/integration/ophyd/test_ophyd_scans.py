"""count / scan / grid_scan with several images per trigger against a real DAQ (embedded broker and
RabbitMQ): every document valid, the images found through the documents equal the file and the
simulator's pattern."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from ophyd.sim import SynAxis

from std_daq_ophyd.testing import RABBITMQ_URL, Daq, Recorder, check_run, make_detector, start_daq


@pytest.fixture(scope="module", params=["threads", "processes",
                                        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def daq(request: pytest.FixtureRequest, ipc_dir: str) -> Iterator[Daq]:
    """Threads of this process and the processes of `std-daq up` on the embedded broker; the
    processes of `std-daq up` on RabbitMQ."""
    if request.param == "rabbitmq":
        daq = start_daq(RABBITMQ_URL, run_as="processes")
    else:
        daq = start_daq(run_as=request.param)
    try:
        yield daq
    finally:
        daq.stop()


def test_count(RE: RunEngine, recorder: Recorder, daq: Daq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=2)
    RE(bp.count([det], 3))
    check_run(recorder, daq, n_events=3, frames=2)
    assert det.writer.images_written.get() == 6


def test_scan(RE: RunEngine, recorder: Recorder, daq: Daq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=3)
    motor = SynAxis(name="motor")
    RE(bp.scan([det], motor, -1, 1, 4))
    check_run(recorder, daq, n_events=4, frames=3)
    assert [e["data"]["motor"] for e in recorder.of("event")] == pytest.approx([-1, -1 / 3, 1 / 3, 1])


def test_grid_scan(RE: RunEngine, recorder: Recorder, daq: Daq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=2)
    m1, m2 = SynAxis(name="m1"), SynAxis(name="m2")
    RE(bp.grid_scan([det], m1, -1, 1, 2, m2, -1, 1, 3))
    check_run(recorder, daq, n_events=6, frames=2)


def test_two_runs_two_files_and_readback_of_settings(RE: RunEngine, recorder: Recorder, daq: Daq,
                                                     data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=1, file_template="{name}_{count:03d}_{uid}.h5")
    det.exptime.put(0.002)
    RE(bp.count([det], 2))
    RE(bp.count([det], 1))
    files = sorted(p.name for p in data_dir.iterdir())
    assert [f[:8] for f in files] == ["det_000_", "det_001_"]
    configs = [d["configuration"]["det"]["data"] for d in recorder.of("descriptor")]
    assert [c["det_exptime"] for c in configs] == [0.002, 0.002]
    assert daq.control.get_config()["exptime"] == 0.002  # what the detector itself was told
    assert configs[0]["det_writer_file_name"] != configs[1]["det_writer_file_name"]


def test_trigger_progress_reaches_watchers(daq: Daq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=5, period=0.05)
    seen: list[dict[str, Any]] = []
    det.stage()
    try:
        status = det.trigger()
        status.watch(lambda **kw: seen.append(kw))
        status.wait(120)
        assert det.n_bad_images.get() == 0
    finally:
        det.unstage()
    assert seen[-1]["current"] == seen[-1]["target"] == 5
    assert {k: seen[-1][k] for k in ("name", "initial", "unit")} == {"name": "det", "initial": 0,
                                                                      "unit": "images"}
    assert all(k in seen[-1] for k in ("fraction", "time_elapsed"))
    currents = [s["current"] for s in seen]
    assert currents == sorted(currents)
