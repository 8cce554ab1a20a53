"""``StdDaqAsyncDetector`` when images go wrong, with faults injected into the built-in simulator (so
the DAQ runs in this process, ``EmbeddedDaq``, the same classes ``std-daq up`` runs as processes):
an incomplete image is written and flagged in the per-image status data key; an image that never
reaches the DAQ fails the wait for images at once, naming the step; a DAQ that is not there fails
``connect`` naming its URL."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from ophyd_async.core import (
    NotConnectedError,
    StaticPathProvider,
    TriggerInfo,
    UUIDFilenameProvider,
    init_devices,
)
from ophyd_async.testing import assert_emitted, assert_value

from daq_backend.testing import free_tcp_port
from std_daq_ophyd.async_devices import (
    AcquisitionStalled,
    AcquisitionStepError,
    AsyncTimeouts,
    StdDaqAsyncDetector,
)
from std_daq_ophyd.readback import stream_data
from std_daq_ophyd.sim import EmbeddedDaq
from std_daq_ophyd.testing import Recorder, assert_pattern, file_rows

TIMEOUTS = AsyncTimeouts(open_file=120.0, idle=120.0, missing=3.0, disarm=60.0, close_file=120.0)


def make(daq: EmbeddedDaq, data_dir: Path) -> StdDaqAsyncDetector:
    with init_devices():
        det = StdDaqAsyncDetector(daq.url, StaticPathProvider(UUIDFilenameProvider(), data_dir),
                                  timeouts=TIMEOUTS, name="det")
    return det


def test_an_incomplete_image_is_written_and_flagged_in_its_status(daq: EmbeddedDaq, data_dir: Path,
                                                                  RE: RunEngine, recorder: Recorder) -> None:
    victim = daq.control.next_image_id + 1
    daq.control.faults = {"drop_packets": [(victim, 0, 7)]}
    det = make(daq, data_dir)
    try:
        RE(bp.count([det], 3))
    finally:
        daq.control.faults = {}
    assert recorder.invalid == []
    docs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, doc in recorder.docs:
        docs[name].append(doc)
    assert_emitted(docs, start=1, descriptor=1, stream_resource=2, stream_datum=6, event=3, stop=1)
    status = stream_data(recorder.docs, "det-status")
    assert status.reshape(-1).tolist() == [0, 1, 0]  # the per-image status, read through the documents
    call_in_bluesky_event_loop(assert_value(det.writer.bad_images, 1))
    rows = file_rows(call_in_bluesky_event_loop(det.writer.file_path.get_value()))
    assert rows["status"].tolist() == [0, 1, 0]
    images = stream_data(recorder.docs, "det")
    np.testing.assert_array_equal(images.reshape(rows["data"].shape), rows["data"])
    good = rows["status"] == 0
    assert_pattern(daq, rows["data"][good], rows["image_id"][good])


def test_an_image_that_never_arrives_fails_the_trigger_naming_the_step(daq: EmbeddedDaq, data_dir: Path,
                                                                       RE: RunEngine) -> None:
    """One whole frame lost on the network: the detector goes idle with the file one image short, and
    the trigger fails ``missing`` s later, not after its exposure timeout of 600 s."""
    victim = daq.control.next_image_id + 1
    daq.control.faults = {"drop_frames": [(victim, 0)]}
    det = make(daq, data_dir)

    async def run() -> str:
        await det.stage()
        try:
            await det.prepare(TriggerInfo(collections_per_event=3, livetime=0.001, deadtime=0.019,
                                          exposure_timeout=600.0))
            never = r"collect: detector .* is IDLE and no image reached .* \(2 written\): the missing images"
            with pytest.raises(AcquisitionStalled, match=never):
                await det.trigger()
            return await det.writer.file_path.get_value()
        finally:
            await det.unstage()

    try:
        path = call_in_bluesky_event_loop(run())
    finally:
        daq.control.faults = {}
    rows = file_rows(path)
    assert rows["image_id"].tolist() == [victim - 1, victim + 1]
    assert str(rows["file_status"]) == "completed"


def test_connect_names_the_daq_that_does_not_answer(RE: RunEngine, data_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_tcp_port()}"
    with pytest.raises(NotConnectedError, match=f"{url}: .*unreachable"):
        with init_devices():
            det = StdDaqAsyncDetector(url, StaticPathProvider(UUIDFilenameProvider(), data_dir))
    assert det.name == "det"


def test_a_folder_the_daq_cannot_write_into_fails_prepare_naming_the_step(daq: EmbeddedDaq, tmp_path: Path,
                                                                          RE: RunEngine) -> None:
    missing = tmp_path / "not-there"
    with init_devices():
        det = StdDaqAsyncDetector(daq.url, StaticPathProvider(UUIDFilenameProvider(), missing),
                                  timeouts=TIMEOUTS)

    async def run() -> None:
        await det.stage()
        try:
            await det.prepare(TriggerInfo())
        finally:
            await det.unstage()

    with pytest.raises(AcquisitionStepError, match=f"open file: .*POST /write_async failed .*{missing}"
                                                   ".* does not exist") as info:
        call_in_bluesky_event_loop(run())
    assert info.value.step == "open file"
    assert not missing.exists()
