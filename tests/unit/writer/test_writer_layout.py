"""The HDF5 layout (``writer.layout.ImageFile``): datasets, attributes, compression, SWMR, recovery."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from daq_backend.config import DetectorConfig
from daq_backend.testing.writer import expected_pixels, make_config
from daq_backend.writer import layout
from daq_backend.writer.layout import FileCreateError, ImageFile, open_image_file, recover_file, written_rows

REPO = Path(__file__).resolve().parents[3]


def _write(file: ImageFile, ids: range, config: DetectorConfig) -> None:
    for image_id in ids:
        pixels = expected_pixels(config, image_id)
        file.append(image_id, image_id % 3, image_id % 5, file.encode(pixels.reshape(-1).view(np.uint8)))


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_layout_datasets_and_attributes(tmp_path: Path, compression: str) -> None:
    config = make_config()
    path = tmp_path / "run.h5"
    metadata = {"sample": "Si", "energy_keV": 12.4, "scan": 7, "flag": True, "axes": [1, 2], "none": None,
                "nested": {"a": 1}}
    with ImageFile.create(path, config, n_images=6, metadata=metadata, compression=compression,
                          request_id="rid-1") as file:
        _write(file, range(100, 106), config)
        assert file.n_written == 6
    with h5py.File(path, "r") as h5:
        assert dict(h5.attrs) | {"start_time": "", "end_time": ""} == {
            "default": "entry", "creator": "std-daq-bluesky daq_backend.writer", "file_name": "run.h5",
            "status": "completed", "n_written": 6, "n_images": 6, "request_id": "rid-1",
            "compression": compression, "start_time": "", "end_time": "", "end_reason": "",
        }
        assert h5.attrs["end_time"] >= h5.attrs["start_time"] != ""
        entry = h5["entry"]
        assert entry.attrs["NX_class"] == "NXentry" and entry.attrs["default"] == "data"
        assert (entry.attrs["sample"], entry.attrs["energy_keV"], entry.attrs["scan"]) == ("Si", 12.4, 7)
        assert entry.attrs["flag"] is np.True_ or entry.attrs["flag"] == True  # noqa: E712
        assert json.loads(entry.attrs["axes"]) == [1, 2] and json.loads(entry.attrs["nested"]) == {"a": 1}
        assert entry.attrs["none"] == "null"
        group = h5["entry/data"]
        assert (group.attrs["NX_class"], group.attrs["signal"]) == ("NXdata", "data")
        data = group["data"]
        assert data.shape == (6, 512, 1024) and data.dtype == np.uint16
        assert data.chunks == (1, 512, 1024) and data.maxshape == (None, 512, 1024)
        if compression == "none":
            assert data.compression is None
        else:
            assert data.id.get_create_plist().get_filter(0)[0] == hdf5plugin.BSHUF_ID
        for i, image_id in enumerate(range(100, 106)):
            np.testing.assert_array_equal(data[i], expected_pixels(config, image_id))
        assert group["image_id"].dtype == np.uint64 and list(group["image_id"]) == list(range(100, 106))
        assert group["status"].dtype == np.uint8 and list(group["status"]) == [i % 3 for i in range(100, 106)]
        assert group["n_missing_packets"].dtype == np.uint32
        assert list(group["n_missing_packets"]) == [i % 5 for i in range(100, 106)]
        assert group["n_written"][()] == 6
        detector = h5["entry/instrument/detector"]
        assert h5["entry/instrument"].attrs["NX_class"] == "NXinstrument"
        assert detector.attrs["NX_class"] == "NXdetector"
        assert json.loads(detector.attrs["config"]) == config.to_json_dict()
        assert detector.attrs["detector_name"] == config.detector_name
        assert detector.attrs["image_pixel_height"] == 512 and detector.attrs["bit_depth"] == 16


def test_compressed_chunks_are_smaller_and_decode_with_plain_h5py(tmp_path: Path) -> None:
    config = make_config()
    with ImageFile.create(tmp_path / "c.h5", config, n_images=3, compression="bitshuffle-lz4") as file:
        _write(file, range(3), config)
    with h5py.File(tmp_path / "c.h5", "r") as h5:
        data = h5[layout.DATA]
        _, chunk = data.id.read_direct_chunk((1, 0, 0))
        assert len(chunk) < config.image_nbytes // 2
        np.testing.assert_array_equal(data[1], expected_pixels(config, 1))


def test_lost_rows_are_zero_with_status_3(tmp_path: Path) -> None:
    config = make_config()
    for compression in ("none", "bitshuffle-lz4"):
        path = tmp_path / f"{compression}.h5"
        with ImageFile.create(path, config, n_images=3, compression=compression) as file:
            _write(file, range(1), config)
            file.append(1, 0, 0, None)
            _write(file, range(2, 3), config)
            file.mark_lost(2)
            file.flush()
            with pytest.raises(IndexError, match="row 0 is not a pending row"):
                file.mark_lost(0)  # flushed rows are final
        with h5py.File(path, "r") as h5:
            assert list(h5[layout.STATUS]) == [0, layout.STATUS_LOST, layout.STATUS_LOST]
            assert not h5[layout.DATA][1:].any()
            np.testing.assert_array_equal(h5[layout.DATA][0], expected_pixels(config, 0))


def test_create_refuses_an_existing_file_unless_overwrite(tmp_path: Path) -> None:
    config = make_config()
    path = tmp_path / "a.h5"
    ImageFile.create(path, config, n_images=1).close("completed")
    with pytest.raises(FileCreateError, match=f"cannot create {path}: file exists"):
        ImageFile.create(path, config, n_images=1)
    with pytest.raises(ValueError, match="compression"):
        ImageFile.create(tmp_path / "b.h5", config, n_images=1, compression="gzip")
    ImageFile.create(path, config, n_images=2, overwrite=True).close("completed")
    with h5py.File(path, "r") as h5:
        assert h5.attrs["n_images"] == 2 and h5.attrs["creator"] == layout.CREATOR
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]  # nothing half-made left


def test_overwrite_replaces_only_a_file_this_daq_wrote(tmp_path: Path) -> None:
    config = make_config()
    text, foreign, link, folder = (tmp_path / n for n in ("notes.txt", "other.h5", "link.h5", "dir.h5"))
    text.write_text("keep me")
    with h5py.File(foreign, "w") as h5:
        h5.attrs["creator"] = "another program"
        h5["x"] = [1, 2, 3]
    ours = tmp_path / "ours.h5"
    ImageFile.create(ours, config, n_images=1).close("completed")
    link.symlink_to(ours)
    folder.mkdir()
    reasons = {
        text: "overwrite replaces only an HDF5 file this DAQ wrote, and it is not an HDF5 file",
        foreign: "it is an HDF5 file of another program (creator 'another program')",
        link: "it is a symbolic link; overwrite never replaces one",
        folder: "it is not a regular file",
    }
    for path, reason in reasons.items():
        pattern = re.escape(f"cannot create {path}: ") + ".*" + re.escape(reason)
        with pytest.raises(FileCreateError, match=pattern):
            ImageFile.create(path, config, n_images=1, overwrite=True)
    assert text.read_text() == "keep me"
    with h5py.File(foreign, "r") as h5:
        assert list(h5["x"]) == [1, 2, 3]
    assert link.is_symlink() and layout.is_daq_file(ours) and not layout.is_daq_file(link)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".creating")]


def test_a_255_byte_name_is_built_under_a_hidden_name_that_fits(tmp_path: Path) -> None:
    path = tmp_path / ("é" * 125 + "ab.h5")  # 250 + 5 bytes
    assert len(path.name.encode()) == 255
    ImageFile.create(path, make_config(), n_images=1).close("completed")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_file_that_cannot_be_built_leaves_nothing_behind(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while the file is built (the library's error text): no ``.creating`` file, no reserve;
    the reserve exists next to a file being written and goes when it is closed."""
    config = make_config()
    path = tmp_path / "a.h5"
    with ImageFile.create(path, config, n_images=1) as file:
        assert layout.reserve_path(path).stat().st_size == layout.RESERVE_BYTES
        file.append(0, 0, 0, file.encode(expected_pixels(config, 0).reshape(-1).view(np.uint8)))
    assert not layout.reserve_path(path).exists() and layout.openable(path)

    def full(*args: object) -> None:
        raise OSError(28, "Can't write data (file write failed: errno = 28, No space left on device)")

    monkeypatch.setattr(ImageFile, "_build", staticmethod(full))
    with pytest.raises(FileCreateError, match="cannot create .*b.h5: no space left on device"):
        ImageFile.create(tmp_path / "b.h5", config, n_images=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]


def test_recover_file_sets_the_status_it_is_given(tmp_path: Path) -> None:
    config = make_config()
    path = tmp_path / "a.h5"
    file = ImageFile.create(path, config, n_images=3)
    _write(file, range(2), config)
    file.flush()
    file.h5.close()  # as if the writer could not close it: status stays "writing"
    assert recover_file(path, "no space left on device after 2 of 3 images", layout.FILE_NO_SPACE) == 2
    with h5py.File(path, "r") as h5:
        assert h5.attrs["status"] == "failed: no space left on device"
        # _write gives image 1 status 1 (missing packets)
        assert layout.file_accounting(h5) == {"n_written": 2, "n_good": 1, "n_lost": 0, "n_incomplete": 1}
    assert not layout.reserve_path(path).exists()


_READER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from daq_backend.writer.layout import open_image_file, written_rows, DATA, IMAGE_ID
    from daq_backend.testing.writer import expected_pixels, make_config
    config = make_config("reader")
    h5 = open_image_file(sys.argv[1])
    for line in sys.stdin:
        n = written_rows(h5)
        data, ids = h5[DATA], h5[IMAGE_ID]
        data.refresh(); ids.refresh()
        ok = all((data[i] == expected_pixels(config, int(ids[i]))).all() for i in range(n))
        print(n, int(ok), flush=True)
""")


def test_a_swmr_reader_in_another_process_follows_the_file(tmp_path: Path) -> None:
    """Rows become visible only with the counter, and every counted row is complete."""
    config = make_config()
    path = tmp_path / "swmr.h5"
    file = ImageFile.create(path, config, n_images=9)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(path), str(REPO)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdin is not None and reader.stdout is not None

    def ask() -> tuple[int, int]:
        reader.stdin.write("?\n")
        reader.stdin.flush()
        n, ok = reader.stdout.readline().split()
        return int(n), int(ok)

    try:
        assert ask() == (0, 1)
        _write(file, range(10, 13), config)
        assert ask() == (0, 1)  # written but not flushed: not counted
        file.flush()
        assert ask() == (3, 1)
        _write(file, range(13, 19), config)
        file.flush()
        assert ask() == (9, 1)
        file.close("completed")
        assert ask() == (9, 1)
    finally:
        reader.stdin.close()
        reader.wait(60)
    assert reader.returncode == 0


_CRASHER = textwrap.dedent("""
    import os, sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from daq_backend.writer.layout import ImageFile
    from daq_backend.testing.writer import expected_pixels, make_config
    config = make_config("crasher")
    file = ImageFile.create(sys.argv[1], config, n_images=100, compression=sys.argv[3])
    for image_id in range(20):
        file.append(image_id, 0, 0, file.encode(expected_pixels(config, image_id).reshape(-1).view(np.uint8)))
        if image_id == 11:
            file.flush()
    print("ready", flush=True)
    sys.stdin.readline()
""")


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_sigkill_leaves_a_valid_file_that_recover_file_finishes(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "crash.h5"
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, str(path), str(REPO), compression],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    config = make_config("crasher")
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    with open_image_file(path) as h5:  # SWMR read opens a crashed file
        assert h5.attrs["status"] == "writing"
        n = written_rows(h5)
        assert n == 12
        for i in range(n):
            np.testing.assert_array_equal(h5[layout.DATA][i], expected_pixels(config, i))
        assert list(h5[layout.IMAGE_ID][:n]) == list(range(12))
    assert recover_file(path) == 12
    with h5py.File(path, "r") as h5:  # now a plain reader opens it too
        assert (h5.attrs["status"], h5.attrs["n_written"]) == ("interrupted", 12)
        assert "stopped before closing" in h5.attrs["end_reason"]
        for name in (layout.DATA, layout.IMAGE_ID, layout.STATUS, layout.N_MISSING_PACKETS):
            assert h5[name].shape[0] == 12
        np.testing.assert_array_equal(h5[layout.DATA][11], expected_pixels(config, 11))
    assert recover_file(path) == 12  # a second recovery changes nothing
