"""The whole DAQ driven through the REST API only, as a beamline client would.

Simulated detector (real UDP over 127.0.0.1) -> receivers -> assembler -> image ring -> writer agent ->
h5 writer -> HDF5, with the detector configured and started by ``POST /detector/<name>`` and the
file requested by ``POST /write_async``; statistics come from the processes' real counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daq_backend.config import DetectorConfig
from daq_backend.control.simulated import SimulatedDetectorControl
from daq_backend.formats import ImageStatus
from daq_backend.simulator.pattern import expected_image
from daq_backend.stats import StatsCollector
from daq_backend.testing import EIGER_HALF_POSITIONS, InProcessReadout, make_config, wait_for
from daq_backend.testing.rest import WAIT_S, RestHarness
from daq_backend.writer import layout

N_FRAMES = 20

CASES: dict[str, dict[str, Any]] = {
    "jungfrau": dict(detector_type="jungfrau", n_modules=1),
    "eiger": dict(detector_type="eiger", n_modules=2, bit_depth=16, image_pixel_height=514,
                  image_pixel_width=514, module_positions=EIGER_HALF_POSITIONS),
}  # fmt: skip


class CollectedStats:
    """What the supervisor would publish, from the processes' own stats messages."""

    def __init__(self, config: DetectorConfig) -> None:
        self.collector = StatsCollector(config.detector_name)

    def __call__(self) -> dict[str, Any]:
        self.collector.drain()
        services = [{"name": name, "alive": True, **entry} for name, entry in self.collector.latest.items()]
        return {"updated": time.time(), "stale": False, "services": services}

    def close(self) -> None:
        self.collector.close()


@pytest.fixture(params=list(CASES))
def daq(request: pytest.FixtureRequest, ipc_env: str, tmp_path: Path) -> Iterator[RestHarness]:
    config = make_config(**CASES[request.param])
    stats = CollectedStats(config)
    readout = InProcessReadout(config)
    control = SimulatedDetectorControl(config)
    controls = {config.detector_name: control, config.detector_type.value: control}
    try:
        harness = RestHarness(tmp_path, config, assembler=False, controls=controls, stats=stats)
    except BaseException:
        readout.close()
        stats.close()
        control.close()
        raise
    try:
        yield harness
    finally:
        harness.close()
        readout.close()
        stats.close()


def test_configure_start_and_write_through_the_api(daq: RestHarness) -> None:
    http, name = daq.http, daq.config.detector_name
    r = http.post(
        f"/detector/{name}", json={"config": {"frames": N_FRAMES, "period": 0.02, "exptime": 0.001}}
    )
    assert r.status_code == 200 and r.json() == {"response": "request_success"}
    config = http.get(f"/detector/{name}").json()
    assert (config["frames"], config["period"], config["exptime"]) == (N_FRAMES, 0.02, 0.001)

    r = http.post("/write_async", json={"n_images": N_FRAMES, "output_file": daq.file("run.h5")})
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    daq.wait_writing(request_id)
    assert http.post("/detector", json={"det_name": name, "cmd": "START"}).json() == {
        "response": "request_success"
    }

    done = daq.wait_state(request_id, "completed", "failed", "interrupted")
    assert done["state"] == "completed", done
    assert done["n_written"] == N_FRAMES
    wait_for(lambda: http.post(f"/detector/{name}", json={"cmd": "STATUS"}).json()["status"] == "IDLE",
             "the detector to finish", WAIT_S)  # fmt: skip

    with h5py.File(daq.file("run.h5"), "r") as h5:
        ids = h5[layout.IMAGE_ID][:]
        assert list(ids) == list(range(1, N_FRAMES + 1))
        assert (h5[layout.STATUS][:] == ImageStatus.GOOD).all()
        assert (h5[layout.N_MISSING_PACKETS][:] == 0).all()
        data = h5[layout.DATA]
        assert data.shape == (N_FRAMES, *daq.config.image_shape)
        for row, image_id in enumerate(ids):
            np.testing.assert_array_equal(data[row], expected_image(daq.config, int(image_id)))

    def counted() -> dict[str, Any] | None:
        stats = http.get("/stats").json()
        counters = {n: p["counters"] for n, p in stats["processes"].items()}
        receivers = [c for n, c in counters.items() if n.startswith("receiver")]
        done = (
            counters.get("assembler", {}).get("images", 0) >= N_FRAMES
            and len(receivers) == daq.config.n_modules
        )
        return stats if done and all(c.get("frames", 0) >= N_FRAMES for c in receivers) else None

    stats = wait_for(counted, "the readout's counters", WAIT_S)
    assert stats["pipeline"] == "up"
    assert stats["lost"]["packets"] == 0 and stats["lost"]["images_missing_packets"] == 0
    assert stats["processes"]["assembler"]["counters"]["images"] == N_FRAMES

    # a second acquisition continues the image ids, as a real detector's frame counter does
    r = http.post("/write_async", json={"n_images": 5, "output_file": daq.file("second.h5")})
    second = r.json()["request_id"]
    daq.wait_writing(second)
    http.post(f"/detector/{name}", json={"config": {"frames": 5}, "cmd": "START"})
    assert daq.wait_state(second, "completed", "failed", "interrupted")["state"] == "completed"
    with h5py.File(daq.file("second.h5"), "r") as h5:
        assert list(h5[layout.IMAGE_ID][:]) == list(range(N_FRAMES + 1, N_FRAMES + 6))
