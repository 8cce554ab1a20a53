"""Reading the images back with Tiled: bluesky's TiledWriter consumes the run's documents and Tiled's
HDF5 adapter reads exactly the file's content."""

from __future__ import annotations

from pathlib import Path

import bluesky.plans as bp
import numpy as np
import tiled.catalog
import tiled.client
import tiled.server.app
from bluesky import RunEngine
from bluesky.callbacks.tiled_writer import TiledWriter
from ophyd.sim import SynAxis

from std_daq_ophyd.sim import EmbeddedDaq
from std_daq_ophyd.testing import Recorder, check_run, make_detector


def test_tiled_reads_the_images_through_the_documents(daq: EmbeddedDaq, data_dir: Path,
                                                      tmp_path: Path) -> None:
    catalog = tiled.catalog.in_memory(
        writable_storage={"filesystem": str(tmp_path / "tiled"), "sql": f"duckdb:///{tmp_path}/catalog.db"},
        readable_storage=[str(data_dir)],
    )
    with tiled.client.Context.from_app(tiled.server.app.build_app(catalog)) as context:
        client = tiled.client.from_context(context)
        det = make_detector(daq, data_dir, frames=3)
        engine = RunEngine({}, call_returns_result=False)
        recorder = Recorder()
        engine.subscribe(recorder)
        engine.subscribe(TiledWriter(client))
        uid, = engine(bp.scan([det], SynAxis(name="motor"), 0, 1, 3))
        primary = client[uid]["primary"]
        images = primary["det_image"].read()
        status = primary["det_image_status"].read()
    rows = check_run(recorder, daq, n_events=3, frames=3)
    assert images.shape == rows["data"].shape
    np.testing.assert_array_equal(images, rows["data"])
    np.testing.assert_array_equal(status, rows["status"])
