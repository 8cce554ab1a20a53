"""Lost images reach the scan: per-image status in the documents, a count per event, and the policy
(fail / warn / ignore) decides what an incomplete image does. Faults come from the detector
simulator (packets dropped on purpose)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus

from std_daq_ophyd import LostImagesError, LostImagesWarning, Timeouts
from std_daq_ophyd.documents import uri_path
from std_daq_ophyd.readback import stream_data
from std_daq_ophyd.sim import EmbeddedDaq
from std_daq_ophyd.testing import Recorder, file_rows, make_detector

FRAMES = 3


@pytest.fixture
def drop_in_second_trigger(daq: EmbeddedDaq) -> Iterator[int]:
    """Packets 5 and 6 of the 2nd image of the 2nd trigger of the next run never leave the detector."""
    victim = daq.control.next_image_id + FRAMES + 1
    def drop(image_id: int, module: int, packet: int) -> bool:
        return image_id == victim and packet in (5, 6)

    daq.control.faults = {"drop_packets": drop}
    try:
        yield victim
    finally:
        daq.control.faults = {}


def check_visible(recorder: Recorder, victim: int) -> None:
    """The incomplete image is visible in the documents: count in its event, status through the datums."""
    assert recorder.invalid == []
    events = recorder.of("event")
    assert [e["data"]["det_n_bad_images"] for e in events][:2] == [0, 1]
    status = stream_data(recorder.docs, "det_image_status")
    assert status[0].tolist() == [0, 0, 0] and status[1].tolist() == [0, 1, 0]  # 1 = missing packets
    path = uri_path(recorder.of("stream_resource")[0]["uri"])
    rows = file_rows(path)
    assert rows["image_id"][FRAMES + 1] == victim and rows["status"][FRAMES + 1] == 1


def test_warn_policy_warns_and_the_scan_goes_on(RE: RunEngine, recorder: Recorder, daq: EmbeddedDaq,
                                                data_dir: Path, drop_in_second_trigger: int) -> None:
    det = make_detector(daq, data_dir, frames=FRAMES, bad_image_policy="warn")
    message = "1 of 3 images of det's acquisition are missing or incomplete"
    with pytest.warns(LostImagesWarning, match=message):
        RE(bp.count([det], 3))
    assert recorder.of("stop")[0]["exit_status"] == "success"
    assert [e["data"]["det_n_bad_images"] for e in recorder.of("event")] == [0, 1, 0]
    check_visible(recorder, drop_in_second_trigger)


def test_ignore_policy_only_records(RE: RunEngine, recorder: Recorder, daq: EmbeddedDaq, data_dir: Path,
                                    drop_in_second_trigger: int) -> None:
    det = make_detector(daq, data_dir, frames=FRAMES, bad_image_policy="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LostImagesWarning)
        RE(bp.count([det], 3))
    assert recorder.of("stop")[0]["exit_status"] == "success"
    check_visible(recorder, drop_in_second_trigger)


def test_fail_policy_fails_the_scan_and_keeps_a_valid_file(RE: RunEngine, recorder: Recorder,
                                                           daq: EmbeddedDaq, data_dir: Path,
                                                           drop_in_second_trigger: int) -> None:
    det = make_detector(daq, data_dir, frames=FRAMES)  # "fail" is the default
    with pytest.raises(FailedStatus) as info:
        RE(bp.count([det], 3))
    assert isinstance(info.value.__cause__, LostImagesError)
    assert "1 of 3 images" in str(info.value.__cause__)
    stop, = recorder.of("stop")
    assert stop["exit_status"] == "fail"
    assert len(recorder.of("event")) == 1  # the second point never became an event
    assert recorder.invalid == []
    rows = file_rows(str(det.writer.file_name.get()))
    assert str(rows["file_status"]) in ("completed", "interrupted")
    assert rows["status"].tolist() == [0, 0, 0, 0, 1, 0]
    assert daq.control.status() == "IDLE"
    np.testing.assert_array_equal(stream_data(recorder.docs, "det_image")[0], rows["data"][:FRAMES])


def test_an_image_that_never_arrives_fails_whatever_the_policy(daq: EmbeddedDaq, data_dir: Path) -> None:
    """A whole frame lost on the network (one module: the image never exists) cannot be matched to its
    point any more: the trigger fails with a clear message even with policy "ignore"."""
    victim = daq.control.next_image_id + 1
    daq.control.faults = {"drop_frames": [(victim, 0)]}
    det = make_detector(daq, data_dir, frames=FRAMES, bad_image_policy="ignore",
                        timeouts=Timeouts(acquisition=120.0, missing=3.0))
    det.stage()
    try:
        with pytest.raises(LostImagesError, match="1 of 3 images never reached the writer"):
            det.trigger().wait(120)
        assert daq.control.status() == "IDLE"
    finally:
        daq.control.faults = {}
        det.unstage()
    rows = file_rows(str(det.writer.file_name.get()))
    assert rows["image_id"].tolist() == [victim - 1, victim + 1]  # a valid file with what arrived
