"""Pause/resume, abort and stop in the middle of an acquisition: detector and writer really stop,
the files stay valid and the document stream stays coherent (every datum points at written rows)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted
from ophyd.sim import SynAxis

from std_daq_ophyd import StdDaqDetector
from std_daq_ophyd.acquisition import AcquisitionCancelled
from std_daq_ophyd.client import StdDaqClient
from std_daq_ophyd.documents import uri_path
from std_daq_ophyd.readback import stream_data
from std_daq_ophyd.testing import Daq, Recorder, assert_pattern, file_rows, make_detector


@pytest.fixture(scope="module")
def daq(daq_threads_and_processes: Daq) -> Daq:
    """Every test here runs against the DAQ in threads and as the processes of `std-daq up`."""
    return daq_threads_and_processes

FRAMES = 6
PERIOD = 0.05  # 0.3 s per trigger: long enough to be interrupted in the middle


def pause_in_trigger(RE: RunEngine, det: StdDaqDetector, trigger: int) -> threading.Event:
    """Request a pause once trigger number ``trigger`` (1-based) has some but not all of its images on
    disk, and hold that acquisition (its thread runs this callback) until the pause has cancelled it:
    the pause always catches the trigger in flight, however slow the machine."""
    fired = threading.Event()
    target = (trigger - 1) * FRAMES + FRAMES // 2

    def on_written(value: int, **_: Any) -> None:
        acquisition = det._acquisition
        if value < target or fired.is_set() or acquisition is None:
            return
        fired.set()
        RE.request_pause(defer=False)
        for _ in range(1200):
            if acquisition.cancelled:
                return
            threading.Event().wait(0.1)

    det.writer.images_written.subscribe(on_written, run=False)
    return fired


def resources(recorder: Recorder, key: str = "det_image") -> list[dict[str, Any]]:
    return [r for r in recorder.of("stream_resource") if r["data_key"] == key]


def assert_coherent(recorder: Recorder, daq: Daq) -> np.ndarray:
    """Documents valid; one datum per key per event; every referenced image is what the simulator sent
    and has consecutive ids within its event. Returns the images of the run (events x frames)."""
    assert recorder.invalid == []
    events = recorder.of("event")
    datums = recorder.of("stream_datum")
    assert len(datums) == 2 * len(events)
    if not events:
        return np.zeros((0,))
    images = stream_data(recorder.docs, "det_image")
    assert images.shape[:2] == (len(events), FRAMES)
    ids_by_file = {}
    for r in resources(recorder):
        path = uri_path(r["uri"])
        rows = file_rows(path)
        assert str(rows["file_status"]) in ("completed", "interrupted")  # closed, valid
        assert_pattern(daq, rows["data"], rows["image_id"])
        ids_by_file[r["uid"]] = rows["image_id"]
    for datum in datums:
        if datum["stream_resource"] in ids_by_file:
            start = datum["indices"]["start"] * FRAMES
            ids = ids_by_file[datum["stream_resource"]][start:start + FRAMES]
            assert len(ids) == FRAMES and np.array_equal(ids, np.arange(ids[0], ids[0] + FRAMES))
    return images


def test_pause_in_a_trigger_then_resume(RE: RunEngine, recorder: Recorder, daq: Daq,
                                        data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=FRAMES, period=PERIOD)
    fired = pause_in_trigger(RE, det, 2)
    with pytest.raises(RunEngineInterrupted):
        RE(bp.scan([det], SynAxis(name="motor"), 0, 1, 4))
    assert fired.is_set() and RE.state == "paused"
    assert daq.control.status() == "IDLE"  # the pause stopped the detector
    RE.resume()
    stop, = recorder.of("stop")
    assert stop["exit_status"] == "success"
    assert len(recorder.of("event")) == 4
    # the trigger cut short left partial images in the first file: the repeated one went to a second
    files = [uri_path(r["uri"]) for r in resources(recorder)]
    assert len(files) == 2
    first, second = file_rows(files[0]), file_rows(files[1])
    # trigger 1 complete, trigger 2 cut (some or, if the detector was faster than the pause, all of its
    # images are in the file: either way no document references them)
    assert FRAMES < len(first["image_id"]) <= 2 * FRAMES
    assert len(second["image_id"]) == 3 * FRAMES
    assert str(second["file_status"]) == "completed"
    assert_coherent(recorder, daq)
    datums = [d for d in recorder.of("stream_datum") if d["stream_resource"] == resources(recorder)[0]["uid"]]
    assert [d["indices"] for d in datums] == [{"start": 0, "stop": 1}]


def test_abort_in_a_trigger(RE: RunEngine, recorder: Recorder, daq: Daq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=FRAMES, period=PERIOD)
    fired = pause_in_trigger(RE, det, 3)
    with pytest.raises(RunEngineInterrupted):
        RE(bp.count([det], 5))
    assert fired.is_set()
    RE.abort("testing abort")
    stop, = recorder.of("stop")
    assert stop["exit_status"] == "abort"
    assert len(recorder.of("event")) == 2
    assert daq.control.status() == "IDLE"
    assert StdDaqClient(daq.url).health().requests_active == 0  # the writer let go of the file
    images = assert_coherent(recorder, daq)
    assert images.shape[0] == 2


def test_stop_during_a_trigger_stops_detector_and_writer(daq: Daq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=200, period=0.05)  # 10 s if nobody stops it
    det.stage()
    try:
        request_id = det.writer.request_id.get()
        status = det.trigger()
        interrupted = threading.Event()
        det.writer.images_written.subscribe(lambda value, **_: value >= 3 and interrupted.set(), run=False)
        assert interrupted.wait(120)
        det.stop()
        with pytest.raises(AcquisitionCancelled):
            status.wait(120)
        assert daq.control.status() == "IDLE"
        answer = StdDaqClient(daq.url).request_status(request_id)
        assert answer.state == "interrupted"
        assert det.writer.request_id.get() == ""
    finally:
        det.unstage()  # nothing left to close: must not fail
    rows = file_rows(str(det.writer.file_name.get()))
    assert str(rows["file_status"]) == "interrupted"
    assert 3 <= len(rows["image_id"]) < 200
    assert_pattern(daq, rows["data"], rows["image_id"])


def test_unstage_during_a_trigger_ends_cleanly(daq: Daq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=200, period=0.05)
    det.stage()
    status = det.trigger()
    started = threading.Event()
    det.writer.images_written.subscribe(lambda value, **_: value >= 2 and started.set(), run=False)
    assert started.wait(120)
    det.unstage()
    with pytest.raises(AcquisitionCancelled):
        status.wait(120)
    assert daq.control.status() == "IDLE"
    rows = file_rows(str(det.writer.file_name.get()))
    assert 2 <= len(rows["image_id"]) < 200 and str(rows["file_status"]) in ("completed", "interrupted")
    det.stage()  # and the detector works again
    det.trigger().wait(120)
    det.unstage()
