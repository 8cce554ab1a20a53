"""The h5 writer on its own, driven with hand-made StoreStream messages: ring slots straight to the
file, lapped slots detected, bad runs ended cleanly, a crashed predecessor's file recovered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daq_backend.config import DetectorConfig
from daq_backend.formats import ImageMetadata, StoreOp
from daq_backend.testing import wait_for
from daq_backend.testing.writer import Driver, FakeAssembler, expected_pixels, make_config
from daq_backend.writer import layout
from daq_backend.writer.h5_writer import H5Writer, journal_path
from daq_backend.writer.layout import ImageFile


@dataclass
class Rig:
    config: DetectorConfig
    assembler: FakeAssembler
    writer: H5Writer
    driver: Driver


@pytest.fixture
def rig() -> Iterator[Rig]:
    config = make_config(slots=8)
    assembler = FakeAssembler(config)
    writer = H5Writer(config).start()
    driver = Driver(config)
    driver.event("alive")  # the SUB is connected
    try:
        yield Rig(config, assembler, writer, driver)
    finally:
        driver.close()
        writer.stop()
        assembler.close()


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_images_go_from_the_ring_slots_to_the_file(rig: Rig, tmp_path: Path, compression: str) -> None:
    config, assembler, writer, driver = rig.config, rig.assembler, rig.writer, rig.driver
    path = tmp_path / "a.h5"
    rid = driver.start(path, 5, compression=compression, metadata={"who": "test"})
    started = driver.event("started", rid)
    assert (started["output_file"], started["n_images"], started["n_written"]) == (str(path), 5, 0)
    assert json.loads(journal_path(config.detector_name).read_text())["output_file"] == str(path)
    for i, image_id in enumerate(range(40, 45)):
        status, missing = (1, 9) if image_id == 42 else (0, 0)
        assembler.produce(image_id, status=status, n_missing=missing, publish=False)
        driver.send(StoreOp.WRITE, rid, str(path), 5, i, assembler.metadata(image_id, status, missing))
    driver.send(StoreOp.STOP, rid, str(path), 5, 5, reason="completed")
    finished = driver.event("finished", rid)
    assert (finished["status"], finished["n_written"], finished["n_missing_images"],
            finished["n_incomplete_images"]) == ("completed", 5, 0, 1)
    assert not journal_path(config.detector_name).exists()
    with h5py.File(path, "r") as h5:
        assert h5.attrs["status"] == "completed" and h5["entry"].attrs["who"] == "test"
        assert list(h5[layout.IMAGE_ID]) == [40, 41, 42, 43, 44]
        assert list(h5[layout.STATUS]) == [0, 0, 1, 0, 0]
        assert list(h5[layout.N_MISSING_PACKETS]) == [0, 0, 9, 0, 0]
        for i in range(5):
            np.testing.assert_array_equal(h5[layout.DATA][i], expected_pixels(config, 40 + i))
    assert writer.stats.images == 5 and writer.stats.files == 1


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_a_lapped_slot_is_reported_never_written_as_good_data(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    config, assembler, writer, driver = rig.config, rig.assembler, rig.writer, rig.driver
    slots = config.image_ring_slots
    path = tmp_path / "lap.h5"
    rid = driver.start(path, 4, compression=compression)
    driver.event("started", rid)
    # id 1 is overwritten (by 1 + slots) before the writer gets to it
    assembler.produce(1, publish=False)
    assembler.produce(1 + slots, publish=False)
    driver.send(StoreOp.WRITE, rid, str(path), 4, 0, assembler.metadata(1))
    # id 2 is lapped *while* it is written: the producer starts overwriting its slot mid-write
    assembler.produce(2, publish=False)
    hook = "append" if compression == "none" else "encode"
    original = getattr(ImageFile, hook)

    def lapping(self: ImageFile, *args: Any) -> Any:
        result = original(self, *args)
        if assembler.ring.holds(2):
            assembler.ring.begin_write(2 + slots)
        return result

    monkeypatch.setattr(ImageFile, hook, lapping)
    driver.send(StoreOp.WRITE, rid, str(path), 4, 1, assembler.metadata(2))
    wait_for(lambda: writer.stats.images == 2, "the writer to write the lapped image")
    monkeypatch.setattr(ImageFile, hook, original)
    for i, image_id in ((2, 3), (3, 4)):
        assembler.produce(image_id, publish=False)
        driver.send(StoreOp.WRITE, rid, str(path), 4, i, assembler.metadata(image_id))
    driver.send(StoreOp.STOP, rid, str(path), 4, 4, reason="completed")
    finished = driver.event("finished", rid)
    assert (finished["status"], finished["n_written"], finished["n_missing_images"]) == ("completed", 4, 2)
    assert writer.stats.images_lost == 2
    with h5py.File(path, "r") as h5:
        assert list(h5[layout.IMAGE_ID]) == [1, 2, 3, 4]
        assert list(h5[layout.STATUS]) == [layout.STATUS_LOST, layout.STATUS_LOST, 0, 0]
        assert not h5[layout.DATA][:2].any()
        np.testing.assert_array_equal(h5[layout.DATA][2], expected_pixels(config, 3))
        np.testing.assert_array_equal(h5[layout.DATA][3], expected_pixels(config, 4))


def test_bad_runs_end_cleanly_and_the_writer_keeps_serving(rig: Rig, tmp_path: Path) -> None:
    assembler, writer, driver = rig.assembler, rig.writer, rig.driver
    existing = tmp_path / "existing.h5"
    existing.write_bytes(b"precious")
    rid = driver.start(existing, 3)
    failed = driver.event("finished", rid)
    assert failed["status"].startswith("failed: cannot create") and "file exists" in failed["status"]
    assert existing.read_bytes() == b"precious"

    rid = driver.start(tmp_path / "no" / "such" / "folder.h5", 3)
    assert "cannot create" in driver.event("finished", rid)["status"]

    # A STOP for a run the writer never had (e.g. it was restarted) still gets an answer.
    driver.send(StoreOp.STOP, "unknown-id", "/x.h5", 1, reason="completed")
    assert "no file open for request unknown-id" in driver.event("finished", "unknown-id")["message"]

    # Garbage on the store stream is counted and ignored.
    driver.push.send(b"{not json")
    driver.push.send(json.dumps({"op": 0}).encode())

    # An image of the wrong geometry fails that file (rows so far kept), not the writer.
    path = tmp_path / "shape.h5"
    rid = driver.start(path, 3)
    driver.event("started", rid)
    assembler.produce(5, publish=False)
    driver.send(StoreOp.WRITE, rid, str(path), 3, 0, assembler.metadata(5))
    bad = ImageMetadata(6, 256, 1024, 2)
    driver.send(StoreOp.WRITE, rid, str(path), 3, 1, bad)
    finished = driver.event("finished", rid)
    assert finished["status"].startswith("failed: image 6 is 256x1024 uint16, the file holds 512x1024")
    assert finished["n_written"] == 1
    driver.send(StoreOp.STOP, rid, str(path), 3, 2, reason="completed")
    assert driver.event("finished", rid) == finished  # the same answer again
    with h5py.File(path, "r") as h5:
        assert h5.attrs["status"].startswith("failed: image 6") and list(h5[layout.IMAGE_ID]) == [5]
    assert writer.stats.bad_messages == 2

    # Still serving; a kill (STOP "killed") marks the file interrupted.
    path = tmp_path / "after.h5"
    rid = driver.start(path, 3)
    driver.event("started", rid)
    assembler.produce(7, publish=False)
    driver.send(StoreOp.WRITE, rid, str(path), 3, 0, assembler.metadata(7))
    driver.send(StoreOp.STOP, rid, str(path), 3, 1, reason="killed")
    finished = driver.event("finished", rid)
    assert (finished["status"], finished["n_written"]) == ("interrupted", 1)
    assert finished["message"] == "killed by request"


def test_a_new_start_supersedes_an_unfinished_run_and_stop_interrupts(rig: Rig, tmp_path: Path) -> None:
    assembler, writer, driver = rig.assembler, rig.writer, rig.driver
    first, second = tmp_path / "first.h5", tmp_path / "second.h5"
    rid1 = driver.start(first, 5)
    driver.event("started", rid1)
    assembler.produce(1, publish=False)
    driver.send(StoreOp.WRITE, rid1, str(first), 5, 0, assembler.metadata(1))
    rid2 = driver.start(second, 5)
    superseded = driver.event("finished", rid1)
    assert superseded["status"] == "interrupted" and "superseded" in superseded["message"]
    driver.event("started", rid2)
    driver.send(StoreOp.WRITE, rid1, str(first), 5, 1, assembler.metadata(1))  # stale run: dropped
    wait_for(lambda: writer.stats.dropped_messages == 1, "the stale message to be dropped")
    writer.stop()
    with h5py.File(first, "r") as h5:
        assert h5.attrs["status"] == "interrupted" and h5.attrs["n_written"] == 1
    with h5py.File(second, "r") as h5:
        assert h5.attrs["status"] == "interrupted"
        assert h5.attrs["end_reason"] == "shutdown: the h5 writer was stopped"
    assert writer.stats.dropped_messages == 1


def test_a_new_writer_recovers_the_file_named_in_the_journal(tmp_path: Path) -> None:
    config = make_config()
    path = tmp_path / "left-open.h5"
    file = ImageFile.create(path, config, n_images=4)
    file.append(3, 0, 0, file.encode(expected_pixels(config, 3).reshape(-1).view(np.uint8)))
    file.flush()
    file.h5.close()  # what a crash leaves: status "writing" (and, after SIGKILL, open-for-write flags)
    journal = journal_path(config.detector_name)
    journal.write_text(json.dumps({"output_file": str(path), "request_id": "x"}))
    writer = H5Writer(config).start()
    writer.stop()
    assert not journal.exists()
    with h5py.File(path, "r") as h5:
        assert (h5.attrs["status"], h5.attrs["n_written"]) == ("interrupted", 1)
        assert "previous h5 writer" in h5.attrs["end_reason"]
