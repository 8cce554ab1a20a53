"""Simulator -> receivers -> assembler -> writer agent -> h5 writer -> HDF5, all in this process:
1000 Jungfrau images at 100 Hz written pixel-exact with zero loss."""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np

from daq_backend.broker import Action, BrokerClient, StatusAggregator, Transport
from daq_backend.simulator.pattern import expected_image
from daq_backend.simulator.sender import DetectorSimulator
from daq_backend.testing import InProcessReadout, assert_no_leftovers, make_config, wait_for
from daq_backend.testing.writer import WAIT_S
from daq_backend.writer import layout
from daq_backend.writer.agent import DetectorWriter

N_IMAGES = 1000
RATE_HZ = 100


def test_simulator_to_hdf5_pixel_exact_without_loss(ipc_env: str, embedded_transport: Transport,
                                                    tmp_path: Path) -> None:
    config = make_config("jungfrau", n_modules=1, image_ring_slots=256)
    path = tmp_path / "jf.h5"
    aggregator = StatusAggregator(embedded_transport, config.detector_name)
    aggregator.start()
    with InProcessReadout(config) as readout:
        writer = DetectorWriter(config, embedded_transport).start()
        try:
            client = BrokerClient(embedded_transport, config.detector_name)
            rid = client.request({"output_file": str(path), "n_images": N_IMAGES})
            wait_for(path.exists, "the file")
            with DetectorSimulator(config, rate_hz=RATE_HZ, n_images=N_IMAGES) as sim:
                sender = threading.Thread(target=sim.run)
                sender.start()
                done = aggregator.wait_for_complete(rid, timeout=WAIT_S + N_IMAGES / RATE_HZ)
                sender.join(WAIT_S)
            action, result = done["services"]["writer_agent"][-1]
            assert action is Action.SUCCESS, result
            assert (result["n_written"], result["status"], result["n_missing_images"],
                    result["n_incomplete_images"]) == (N_IMAGES, "completed", 0, 0)
            assert readout.assembler.stats.images == N_IMAGES
        finally:
            writer.stop()
    aggregator.stop()
    with h5py.File(path, "r") as h5:
        assert (h5.attrs["status"], h5.attrs["n_written"]) == ("completed", N_IMAGES)
        assert list(h5[layout.IMAGE_ID]) == list(range(1, N_IMAGES + 1))
        assert not h5[layout.STATUS][:].any() and not h5[layout.N_MISSING_PACKETS][:].any()
        data = h5[layout.DATA]
        assert data.shape == (N_IMAGES, 512, 1024)
        for i in range(N_IMAGES):
            np.testing.assert_array_equal(data[i], expected_image(config, i + 1), err_msg=f"image {i + 1}")
    assert_no_leftovers(config, ipc_env)
