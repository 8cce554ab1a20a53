"""N h5 writers on one host (``n_writers`` 2 and 4): through the processes ``std-daq up`` runs, on
RabbitMQ, with real UDP from the built-in simulator on loopback, one write request becomes a master
file at the requested ``output_file`` over the part files ``<name>_part<k>.h5`` beside it.

* the master reads pixel-exact in image order while the parts are written (a SWMR reader that
  refreshes, counting only the leading complete rows) and after the request; REST, the broker
  status and the master agree on ``n_written`` and the accounting;
* the StdDaqDetector (ophyd v1) and Tiled read the images back through the run's documents, whose
  StreamResource names the master.

The kill -9 of one of several writers is in ``tests/fault/test_writer_scaleout_faults.py``.
"""

from __future__ import annotations

from pathlib import Path

import bluesky.plans as bp
import h5py
import numpy as np
import pytest
import requests
import tiled.catalog
import tiled.client
import tiled.server.app
from bluesky import RunEngine
from bluesky.callbacks.tiled_writer import TiledWriter
from ophyd.sim import SynAxis

from daq_backend.broker import Transport
from daq_backend.broker.protocol import Action
from daq_backend.testing import wait_for
from daq_backend.testing.up import (
    Broker,
    Detector,
    assert_agree,
    assert_rows,
    leading,
    part_paths,
    scaled_daq,
    submit,
    writer_names,
)
from daq_backend.testing.writer import Harness, expected_pixels
from daq_backend.testing.writer import make_config as writer_config
from daq_backend.writer import layout, master
from std_daq_ophyd.sim import EmbeddedDaq, LocalDaq, simulated_config
from std_daq_ophyd.testing import (
    EXPOSURE_TIMEOUT,
    EXPTIME,
    PERIOD,
    Recorder,
    check_file,
    check_run,
    fly,
    make_async_detector,
    make_detector,
)

N_IMAGES = 120


@pytest.mark.parametrize(("n_writers", "compression"), [(2, "none"), (4, "none"), (2, "bitshuffle-lz4")])
def test_master_reads_in_image_order_while_written_and_after(ipc_env: str, tmp_path: Path, n_writers: int,
                                                             compression: str) -> None:
    with scaled_daq(ipc_env, tmp_path, n_writers) as daq, Detector(daq.config), \
            Broker(daq.config.detector_name) as broker:
        request_id, output = submit(daq, "run.h5", N_IMAGES, compression=compression)
        # while writing: a SWMR reader of the master sees the rows the parts flushed, after refresh()
        wait_for(lambda: output.exists() and leading(output) >= N_IMAGES // 4, "a quarter written", 180)
        with h5py.File(output, "r", swmr=True) as reader:
            seen = []
            for _ in range(2):
                n = leading(output)  # complete rows first, then read them: they only grow
                for name in (layout.DATA, layout.IMAGE_ID, layout.STATUS):
                    reader[name].refresh()
                assert reader[layout.DATA].shape[0] >= n
                assert_rows(daq.config, reader, n)
                seen.append(n)
                wait_for(lambda n=n: leading(output) > n or leading(output) == N_IMAGES, "more rows", 180)
        assert seen[0] >= N_IMAGES // 4 and seen[1] > seen[0] or seen[1] == N_IMAGES
        rest = wait_for(lambda: (s := daq.rest(request_id))["state"] in ("completed", "failed") and s,
                        "the request final", 180)
        action, message = broker.final(request_id, 60)
    assert rest["state"] == "completed" and action is Action.SUCCESS, (rest, message)
    with h5py.File(output, "r") as h5:  # a plain reader, after the request
        assert master.is_master(h5) and h5.attrs["n_writers"] == n_writers
        assert h5.attrs["status"] == layout.FILE_COMPLETED and h5.attrs["n_written"] == N_IMAGES
        assert h5[layout.DATA].is_virtual and h5[layout.DATA].shape[0] == N_IMAGES
        assert_rows(daq.config, h5, N_IMAGES)
        assert h5[layout.DETECTOR].attrs["detector_name"] == daq.config.detector_name
    for k, part in enumerate(part_paths(output, n_writers)):  # writer k holds rows k, k+N, ...
        with h5py.File(part, "r") as h5:
            assert h5.attrs["status"] == layout.FILE_COMPLETED and h5.attrs["compression"] == compression
            assert layout.written_rows(h5) == master.part_share(N_IMAGES, k, n_writers)
    counts = master.master_accounting(output)
    assert counts["n_written"] == counts["n_good"] == N_IMAGES
    assert_agree(rest, counts, N_IMAGES)
    assert message["n_written"] == N_IMAGES


def test_fewer_images_than_writers_leave_complete_empty_parts(ipc_env: str, tmp_path: Path) -> None:
    with scaled_daq(ipc_env, tmp_path, 4) as daq, Detector(daq.config):
        answer = requests.post(f"{daq.url}/write_sync", json={
            "output_file": str(daq.output / "short.h5"), "n_images": 3, "timeout": 60}, timeout=300)
        assert answer.status_code == 200 and answer.json()["response"]["state"] == "completed", answer.text
    output = daq.output / "short.h5"
    with h5py.File(output, "r") as h5:
        assert (h5.attrs["status"], h5.attrs["n_written"]) == ("completed", 3)
        assert_rows(daq.config, h5, 3)
    empty = part_paths(output, 4)[3]  # the fourth writer has no row: its part is complete and empty
    with h5py.File(empty, "r") as h5:
        assert h5.attrs["status"] == layout.FILE_COMPLETED and layout.written_rows(h5) == 0


@pytest.mark.parametrize(("n_writers", "run_as", "compression"), [
    (2, "processes", "none"), (4, "processes", "bitshuffle-lz4"), (2, "threads", "none")])
def test_ophyd_detector_and_tiled_read_the_master_through_the_documents(
        ipc_env: str, tmp_path: Path, n_writers: int, run_as: str, compression: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = simulated_config(n_writers=n_writers)
    daq: LocalDaq | EmbeddedDaq
    if run_as == "processes":
        daq = LocalDaq(config, output_roots=[data_dir]).start()
        assert writer_names(n_writers) <= {s.name for s in daq.supervisor.services}
    else:  # the same roles as threads of this process
        daq = EmbeddedDaq(config, output_roots=[data_dir]).start()
    try:
        catalog = tiled.catalog.in_memory(
            writable_storage={"filesystem": str(tmp_path / "tiled"), "sql": f"duckdb:///{tmp_path}/catalog.db"},
            readable_storage=[str(data_dir)],
        )
        with tiled.client.Context.from_app(tiled.server.app.build_app(catalog)) as context:
            client = tiled.client.from_context(context)
            det = make_detector(daq, data_dir, frames=3)
            det.writer.compression.put(compression)
            engine = RunEngine({}, call_returns_result=False)
            recorder = Recorder()
            engine.subscribe(recorder)
            engine.subscribe(TiledWriter(client))
            uid, = engine(bp.scan([det], SynAxis(name="motor"), 0, 1, 3))
            primary = client[uid]["primary"]
            images = primary["det_image"].read()
            status = primary["det_image_status"].read()
        rows = check_run(recorder, daq, n_events=3, frames=3)  # pixel-exact against the simulator
        resource, = [r for r in recorder.of("stream_resource") if r["data_key"] == "det_image"]
        path = Path(resource["uri"].removeprefix("file://localhost"))
        with h5py.File(path, "r") as h5:
            assert master.is_master(h5) and h5.attrs["n_writers"] == n_writers
        with h5py.File(part_paths(path, n_writers)[0], "r") as h5:
            assert h5.attrs["compression"] == compression
    finally:
        daq.stop()
    assert images.shape == rows["data"].shape
    np.testing.assert_array_equal(images, rows["data"])
    np.testing.assert_array_equal(status, rows["status"])


def test_ophyd_async_fly_scan_and_tiled_read_the_master(ipc_env: str, tmp_path: Path) -> None:
    """``StdDaqAsyncDetector``'s open-ended request (finished at the end of the fly scan) over two
    writers: one StreamResource per data key, naming the master, and Tiled reads it pixel-exact."""
    from ophyd_async.core import TriggerInfo


    data_dir = tmp_path / "data"
    data_dir.mkdir()
    daq = LocalDaq(simulated_config(n_writers=2), output_roots=[data_dir]).start()
    try:
        catalog = tiled.catalog.in_memory(
            writable_storage={"filesystem": str(tmp_path / "tiled"), "sql": f"duckdb:///{tmp_path}/catalog.db"},
            readable_storage=[str(data_dir)],
        )
        with tiled.client.Context.from_app(tiled.server.app.build_app(catalog)) as context:
            client = tiled.client.from_context(context)
            engine = RunEngine({}, call_returns_result=False)  # first: the devices connect in its loop
            det = make_async_detector(daq, data_dir)  # type: ignore[arg-type]  (url and config suffice)
            recorder = Recorder()
            engine.subscribe(recorder)
            engine.subscribe(TiledWriter(client))
            info = TriggerInfo(number_of_events=5, collections_per_event=2, livetime=EXPTIME,
                               deadtime=PERIOD - EXPTIME, exposure_timeout=EXPOSURE_TIMEOUT)
            engine(fly(det, info))
            uid = recorder.of("start")[0]["uid"]
            primary = client[uid]["primary"]
            path = check_file(daq, recorder, primary["det"].read(), primary["det-status"].read(),  # type: ignore[arg-type]
                              10)
        with h5py.File(path, "r") as h5:
            assert master.is_master(h5) and h5.attrs["n_writers"] == 2
            assert (h5.attrs["n_written"], h5.attrs["n_images"]) == (10, 10)  # open-ended: what it got
    finally:
        daq.stop()


def test_a_lost_image_keeps_its_row_so_the_rows_stay_in_image_order(tmp_path: Path,
                                                                    embedded_transport: Transport) -> None:
    """An image whose ring slot was overwritten before a writer read it is written as a lost row
    (zeros, status 3) in its part: the master keeps every later row in its place."""
    h = Harness(tmp_path, writer_config(n_writers=2), embedded_transport)
    try:
        h.start_writer()
        output = tmp_path / "lost.h5"
        rid = h.request(output_file=str(output), n_images=10)
        wait_for(output.exists, "the master", 60)
        slots = h.config.image_ring_slots
        for image_id in range(1, 11):
            if image_id == 6:  # its slot already holds a later image: lost when a writer reads it
                h.assembler.produce(6 + slots, publish=False)
                h.assembler.pub.send(h.assembler.metadata(6).pack())
            else:
                h.assembler.produce(image_id)
        action, result = h.final(rid)
    finally:
        h.close()
    assert action is Action.SUCCESS and result["status"] == "completed", result
    assert (result["n_written"], result["n_missing_images"], result["n_incomplete_images"]) == (10, 1, 0)
    with h5py.File(output, "r") as h5:
        np.testing.assert_array_equal(h5[layout.IMAGE_ID][:], np.arange(1, 11))
        status = h5[layout.STATUS][:]
        assert status[5] == layout.STATUS_LOST and not np.delete(status, 5).any()
        assert not h5[layout.DATA][5].any()
        for row in (0, 4, 6, 9):
            np.testing.assert_array_equal(h5[layout.DATA][row], expected_pixels(h.config, row + 1))
    with h5py.File(part_paths(output, 2)[1], "r") as h5:  # row 5 is row 2 of writer 1's part
        assert h5[layout.STATUS][2] == layout.STATUS_LOST
    counts = master.master_accounting(output)
    assert (counts["n_written"], counts["n_lost"], counts["n_good"]) == (10, 1, 9)


def test_a_part_name_taken_refuses_the_request_before_any_file(tmp_path: Path,
                                                               embedded_transport: Transport) -> None:
    """The master's and every part's name follow the overwrite rule: a part name held by a file this
    DAQ did not write fails the request, naming the part, before the master or a part is created;
    with ``overwrite`` a part this DAQ wrote is replaced."""
    h = Harness(tmp_path, writer_config(n_writers=2), embedded_transport)
    try:
        h.start_writer(output_roots=[tmp_path])
        output = tmp_path / "taken.h5"
        foreign = part_paths(output, 2)[1]
        foreign.write_text("not ours")
        action, message = h.final(h.request(output_file=str(output), n_images=4))
        assert action is Action.FAIL and str(foreign) in message and "file exists" in message, message
        action, message = h.final(h.request(output_file=str(output), n_images=4, overwrite=True))
        assert action is Action.FAIL and str(foreign) in message and "this DAQ wrote" in message, message
        assert sorted(p.name for p in tmp_path.glob("taken*")) == ["taken_part1.h5"]  # nothing made
        foreign.unlink()
        h.assembler.start(rate_hz=100)
        for attempt in ("first", "again"):  # the second replaces the master and parts of the first
            action, result = h.final(h.request(output_file=str(output), n_images=4, overwrite=True))
            assert action is Action.SUCCESS and result["n_written"] == 4, (attempt, result)
    finally:
        h.close()
    with h5py.File(output, "r") as h5:
        assert h5.attrs["status"] == "completed"
        ids = h5[layout.IMAGE_ID][:]
        for row, image_id in enumerate(ids):
            np.testing.assert_array_equal(h5[layout.DATA][row], expected_pixels(h.config, int(image_id)))
