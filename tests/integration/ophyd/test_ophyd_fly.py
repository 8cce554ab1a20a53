"""Fly scanning: one continuous acquisition (kickoff / complete), collected while it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine

from std_daq_ophyd import fly
from std_daq_ophyd.documents import uri_path
from std_daq_ophyd.readback import stream_data
from std_daq_ophyd.testing import Daq, Recorder, assert_pattern, file_rows, make_detector


@pytest.fixture(scope="module")
def daq(daq_threads_and_processes: Daq) -> Daq:
    """Every test here runs against the DAQ in threads and as the processes of `std-daq up`."""
    return daq_threads_and_processes


def test_fly_plan_collects_every_image(RE: RunEngine, recorder: Recorder, daq: Daq,
                                       data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=2, period=0.05)
    det.triggers.put(10)
    RE(fly(det, flush_period=0.2))
    assert recorder.invalid == []
    stop, = recorder.of("stop")
    assert stop["exit_status"] == "success"
    descriptor, = recorder.of("descriptor")
    assert descriptor["name"] == "det_stream"
    assert descriptor["data_keys"]["det_image"]["shape"] == [2, *daq.config.image_shape]
    assert recorder.of("event") == []  # file data only: stream datums, no events
    image_resource = recorder.of("stream_resource")[0]["uid"]
    datums = [d for d in recorder.of("stream_datum") if d["stream_resource"] == image_resource]
    covered = [(d["indices"]["start"], d["indices"]["stop"]) for d in datums]
    assert covered[0][0] == 0 and covered[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))  # contiguous, no overlap
    seq = [(d["seq_nums"]["start"], d["seq_nums"]["stop"]) for d in datums]
    assert seq[0][0] == 1 and seq[-1][1] == 11
    images = stream_data(recorder.docs, "det_image")
    assert images.shape == (10, 2, *daq.config.image_shape)
    rows = file_rows(uri_path(recorder.of("stream_resource")[0]["uri"]))
    assert str(rows["file_status"]) == "completed"
    np.testing.assert_array_equal(images.reshape(rows["data"].shape), rows["data"])
    assert_pattern(daq, rows["data"], rows["image_id"])


def test_kickoff_complete_progress_and_step_triggers_after(daq: Daq, data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=3, period=0.02)
    det.triggers.put(4)
    seen: list[dict[str, Any]] = []
    det.stage()
    try:
        det.kickoff().wait(60)
        status = det.complete()
        status.watch(lambda **kw: seen.append(kw))
        status.wait(120)
        assert det.get_index() == 4
        fly_docs = list(det.collect_asset_docs())
        det.trigger().wait(120)  # a step trigger after the fly scan is one index of 3 images again
        assert det.get_index() == 5
        step_docs = list(det.collect_asset_docs())
    finally:
        det.unstage()
    assert seen[-1]["current"] == seen[-1]["target"] == 12 and seen[-1]["unit"] == "images"
    assert [d["indices"] for n, d in fly_docs if n == "stream_datum"] == [{"start": 0, "stop": 4}] * 2
    assert [d["indices"] for n, d in step_docs if n == "stream_datum"] == [{"start": 4, "stop": 5}] * 2
    assert daq.control.get_config()["triggers"] == 1
    rows = file_rows(str(det.writer.file_name.get()))
    assert len(rows["image_id"]) == 15
    assert_pattern(daq, rows["data"], rows["image_id"])
