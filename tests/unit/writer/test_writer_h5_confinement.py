"""The h5 writer enforces the output roots itself, at open time: whatever reaches its store stream (an
agent with other roots, a folder swapped for a symlink after the agent checked it), no file is made or
replaced outside its roots, and a journal naming a file outside them is not followed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from daq_backend.formats import StoreOp
from daq_backend.testing.writer import Driver, FakeAssembler, make_config
from daq_backend.writer import layout, roots
from daq_backend.writer.h5_writer import H5Writer, journal_path
from daq_backend.writer.layout import ImageFile


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def driven(root: Path, ipc_env: str) -> Iterator[tuple[Driver, FakeAssembler]]:
    config = make_config(slots=8)
    assembler = FakeAssembler(config)
    writer = H5Writer(config, output_roots=[root]).start()
    driver = Driver(config)
    driver.event("alive")
    try:
        yield driver, assembler
    finally:
        driver.close()
        writer.stop()
        assembler.close()


def failed(driver: Driver, output_file: str | Path, **request: object) -> str:
    rid = driver.start(Path(output_file), 1, **request) if os.path.isabs(output_file) else None
    if rid is None:  # a relative name as the request says it
        driver.run_id += 1
        rid = f"rel-{driver.run_id}"
        body = {"output_file": str(output_file), "n_images": 1, **request}
        driver.send(StoreOp.START, rid, str(output_file), 1, request=body)
    event = driver.event("finished", rid)
    assert event["status"].startswith("failed: "), event
    return str(event["message"])


def test_files_outside_its_roots_are_never_made_or_replaced(driven: tuple[Driver, FakeAssembler], root: Path,
                                                            tmp_path: Path) -> None:
    driver, _ = driven
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "notes.txt"
    victim.write_text("keep")
    (root / "link").symlink_to(outside)
    for path in (victim, root / "link" / "notes.txt", root / ".." / "outside" / "notes.txt"):
        message = failed(driver, path, overwrite=True)
        assert f"is outside the folders this DAQ writes to ({root})" in message, message
    assert "is outside the folders" in failed(driver, "../outside/notes.txt", overwrite=True)
    text = root / "text.h5"
    text.write_text("not data")
    assert "it is not an HDF5 file" in failed(driver, text, overwrite=True)
    assert victim.read_text() == "keep" and text.read_text() == "not data"
    assert sorted(p.name for p in outside.iterdir()) == ["notes.txt"]
    # a relative name is made in the first root
    rid = "rel-ok"
    driver.send(StoreOp.START, rid, "ok.h5", 1, request={"output_file": "ok.h5", "n_images": 1})
    assert driver.event("started", rid)["output_file"] == str(root / "ok.h5")
    driver.send(StoreOp.STOP, rid, "ok.h5", 1, reason="killed")
    assert driver.event("finished", rid)["status"] == "interrupted"
    assert layout.is_daq_file(root / "ok.h5")


def test_a_folder_swapped_for_a_symlink_after_the_check_is_not_followed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resolved folder is opened component by component with O_NOFOLLOW: a component that became a
    symlink between resolving and opening (the swap race) stops the walk."""
    outside = tmp_path / "outside"
    outside.mkdir()
    sub = root / "sub"
    (sub / "deeper").mkdir(parents=True)
    resolved = {str(root): str(root), str(sub / "deeper"): str(sub / "deeper")}
    fd = roots.open_folder(sub / "deeper", [root])
    os.close(fd)
    # the swap: sub becomes a symlink to outside (with a "deeper" folder) once it has been resolved
    (outside / "deeper").mkdir()
    os.rename(sub, tmp_path / "moved")
    sub.symlink_to(outside)
    real = os.path.realpath
    monkeypatch.setattr(roots.os.path, "realpath", lambda p: resolved.get(str(p), real(p)))
    with pytest.raises(ValueError, match=r"it changed while it was checked \(sub: Not a directory\); "
                                         r"refusing to follow it"):
        roots.open_folder(sub / "deeper", [root])
    monkeypatch.undo()
    with pytest.raises(roots.OutsideRootsError):  # resolved again, it is outside
        roots.open_folder(sub / "deeper", [root])
    assert list((outside / "deeper").iterdir()) == []


def test_a_journal_naming_a_file_outside_the_roots_is_not_followed(root: Path, tmp_path: Path,
                                                                   ipc_env: str) -> None:
    config = make_config(slots=8)
    outside = tmp_path / "outside.h5"
    file = ImageFile.create(outside, config, n_images=3)
    file.h5.close()  # as a crashed writer leaves it: status "writing"
    journal = journal_path(config.detector_name)
    journal.write_text(json.dumps({"output_file": str(outside), "request_id": "x"}))
    writer = H5Writer(config, output_roots=[root]).start()
    writer.stop()
    assert not journal.exists()
    with h5py.File(outside, "r", swmr=True) as h5:
        assert h5.attrs["status"] == "writing"  # not touched
