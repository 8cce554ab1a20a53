"""A configuration that cannot work fails at ``stage`` — before the detector starts, before the run
opens — with a message naming what is wrong."""

from __future__ import annotations

import socket
from pathlib import Path

import bluesky.plans as bp
import pytest
from bluesky import RunEngine

from std_daq_ophyd import SettingsError, StdDaqDetector, StdDaqError, StdDaqUnreachable
from std_daq_ophyd.client import StdDaqClient
from std_daq_ophyd.sim import EmbeddedDaq
from std_daq_ophyd.testing import Recorder, make_detector


def assert_nothing_started(daq: EmbeddedDaq, data_dir: Path, first_id: int) -> None:
    assert daq.control.status() == "IDLE"
    assert daq.control.next_image_id == first_id  # not a single image was sent
    assert list(data_dir.iterdir()) == []
    assert StdDaqClient(daq.url).health().requests_active == 0


@pytest.mark.parametrize(("signal", "value", "message"), [
    ("exptime", -0.001, "det: cannot stage: exptime must be a positive number of seconds, got -0.001"),
    ("timing", "SOMETIMES", "timing 'SOMETIMES' is not a timing mode"),
    ("frames_per_trigger", 0, "frames must be an integer >= 1"),
    ("period", -1.0, "period must be >= 0"),
    ("bad_image_policy", "shrug", "bad_image_policy must be one of fail, warn, ignore"),
])
def test_bad_setting_fails_at_stage_in_a_plan(RE: RunEngine, recorder: Recorder, daq: EmbeddedDaq,
                                              data_dir: Path, signal: str, value: object,
                                              message: str) -> None:
    det = make_detector(daq, data_dir)
    getattr(det, signal).put(value)
    first_id = daq.control.next_image_id
    with pytest.raises(SettingsError, match=message):
        RE(bp.count([det], 1))
    assert recorder.docs == []  # the run never opened
    assert_nothing_started(daq, data_dir, first_id)


def test_setting_refused_by_the_detector_fails_at_stage(daq: EmbeddedDaq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir)
    det.bit_depth.put(32)  # a Jungfrau has one dynamic range, 16 bit: only the backend knows
    first_id = daq.control.next_image_id
    with pytest.raises(StdDaqError, match=r"det: cannot stage: .*HTTP 400.*dr"):
        det.stage()
    assert_nothing_started(daq, data_dir, first_id)
    det.bit_depth.put(0)
    det.stage()  # the device is usable again after the failed stage
    det.unstage()


def test_unwritable_output_dir_fails_at_stage(daq: EmbeddedDaq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir / "missing" / "deeper")
    (data_dir / "missing").write_text("a file where a folder should be")
    first_id = daq.control.next_image_id
    with pytest.raises(StdDaqError, match="output_file"):
        det.stage()
    assert daq.control.next_image_id == first_id
    assert StdDaqClient(daq.url).health().requests_active == 0


def test_unreachable_backend_fails_at_stage(data_dir: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    det = StdDaqDetector(name="det", url=f"http://127.0.0.1:{port}", output_dir=str(data_dir))
    engine = RunEngine({})
    seen: list[str] = []
    engine.subscribe(lambda name, doc: seen.append(name))
    expected = rf"det: cannot stage: std-daq backend at http://127.0.0.1:{port} is unreachable"
    with pytest.raises(StdDaqUnreachable, match=expected):
        engine(bp.count([det], 1))
    assert seen == []
    assert list(data_dir.iterdir()) == []
