"""The master file over part files (``daq_backend.writer.master``): rows modulo N writers presented in
image order through HDF5 virtual datasets, while the parts are written (by other processes, SWMR) and
after; a killed part writer; compressed parts; a copy of the folder moved elsewhere; parts covering
regions of the image (a detector over several hosts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle for the reader)
import numpy as np
import pytest

from daq_backend.config import DetectorConfig
from daq_backend.simulator.pattern import expected_image
from daq_backend.testing import make_config
from daq_backend.writer import layout, master

FIRST_ID = 1000

#: a part writer in its own process: "rows A B" appends the request's rows A..B-1 that are its own
#: and flushes; it answers with its flushed row count on stdout
PART_WRITER = r"""
import json, sys
import numpy as np
from daq_backend.config import parse_config
from daq_backend.simulator.pattern import expected_image
from daq_backend.writer.layout import ImageFile
args = json.loads(sys.argv[1])
config = parse_config(args["config"])
full = parse_config(args["full_config"])
k, n, first = args["writer"], args["n_writers"], args["first_id"]
y, x, h, w = args["region"]
f = ImageFile.create(args["path"], config, n_images=0, compression=args["compression"])
for line in sys.stdin:
    cmd, *rest = line.split()
    if cmd == "rows":
        a, b = map(int, rest)
        for row in range(a, b):
            if row % n == k:
                image = np.ascontiguousarray(expected_image(full, first + row)[y:y + h, x:x + w])
                f.append(first + row, 0, 0, f.encode(image))
        f.flush()
    elif cmd == "close":
        f.close("completed")
        print("closed", flush=True)
        break
    print(f.n_flushed, flush=True)
"""


class PartWriter:
    """Writer ``writer`` of ``n_writers``, in its own process, writing its part of the request."""

    def __init__(self, path: Path, config: DetectorConfig, full: DetectorConfig, writer: int, n_writers: int,
                 compression: str = "none", region: tuple[int, int, int, int] | None = None) -> None:
        h, w = full.image_shape
        args = {"path": str(path), "config": config.to_json_dict(), "full_config": full.to_json_dict(),
                "writer": writer, "n_writers": n_writers, "first_id": FIRST_ID,
                "region": list(region or (0, 0, h, w)), "compression": compression}
        self.proc = subprocess.Popen([sys.executable, "-c", PART_WRITER, json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def rows(self, a: int, b: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"rows {a} {b}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "closed"
        assert self.proc.wait(60) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)


def parts_of(output: Path, n_writers: int) -> list[master.Part]:
    return [master.Part(master.part_file_name(output, k), k, n_writers) for k in range(n_writers)]


def start(output: Path, config: DetectorConfig, n_writers: int,
          compression: str = "none") -> list[PartWriter]:
    parts = parts_of(output, n_writers)
    master.create_master(output, parts, image_shape=config.image_shape, image_dtype=config.image_dtype,
                         n_images=0)
    return [PartWriter(output.parent / p.file, config, config, p.writer, n_writers, compression)
            for p in parts]


def check_rows(path: Path, config: DetectorConfig, n_rows: int, *, swmr: bool = False) -> None:
    """The master's first ``n_rows`` rows are the request's images, in image order."""
    with h5py.File(path, "r", swmr=swmr) as h5:
        data, ids, status = h5[layout.DATA], h5[layout.IMAGE_ID], h5[layout.STATUS]
        assert data.is_virtual and data.shape[0] >= n_rows
        np.testing.assert_array_equal(ids[:n_rows], np.arange(FIRST_ID, FIRST_ID + n_rows))
        assert not status[:n_rows].any()
        for row in range(n_rows):
            np.testing.assert_array_equal(data[row], expected_image(config, FIRST_ID + row),
                                          err_msg=f"row {row}")


@pytest.mark.parametrize("n_writers", [2, 4])
def test_master_reads_in_image_order_while_written_and_after(tmp_path: Path, n_writers: int) -> None:
    config = make_config("jungfrau")
    output = tmp_path / "run.h5"
    writers = start(output, config, n_writers)
    try:
        with h5py.File(output, "r", swmr=True) as reader:
            data = reader[layout.DATA]
            assert data.shape[0] == 0
            for a, b in ((0, 5), (5, 13), (13, 30)):
                flushed = [w.rows(a, b) for w in writers]
                assert master.leading_rows(flushed) == b
                data.refresh()
                reader[layout.IMAGE_ID].refresh()
                assert data.shape[0] == b  # every part flushed its rows below b: nothing beyond
                np.testing.assert_array_equal(reader[layout.IMAGE_ID][:b], np.arange(FIRST_ID, FIRST_ID + b))
                np.testing.assert_array_equal(data[b - 1], expected_image(config, FIRST_ID + b - 1))
        assert master.part_rows(output) == [len(range(k, 30, n_writers)) for k in range(n_writers)]
    finally:
        for w in writers:
            w.close()
    assert master.finish_master(output, layout.FILE_COMPLETED) == 30
    check_rows(output, config, 30)
    with h5py.File(output, "r") as h5:
        assert h5.attrs["status"] == "completed" and h5.attrs["n_written"] == 30
        assert h5.attrs["n_writers"] == n_writers
        assert h5[layout.DETECTOR].attrs["detector_name"] == config.detector_name  # the first part's


def test_killed_writer_leaves_the_leading_complete_rows(tmp_path: Path) -> None:
    config = make_config("jungfrau")
    output = tmp_path / "run.h5"
    writers = start(output, config, 2)
    assert [w.rows(0, 10) for w in writers] == [5, 5]
    writers[1].kill()                       # writer 1 dies with rows 1, 3, .., 9 flushed
    assert writers[0].rows(10, 20) == 10   # writer 0 goes on: rows 0, 2, .., 18
    writers[0].close()
    assert layout.recover_file(output.parent / master.part_file_name(output, 1)) == 5
    assert master.part_rows(output) == [10, 5]
    assert master.leading_rows([10, 5]) == 11  # row 11 (writer 1's sixth) is the first missing
    assert master.finish_master(output, layout.FILE_INTERRUPTED, "writer 1 of 2 died") == 11
    check_rows(output, config, 11)
    with h5py.File(output, "r") as h5:
        assert (h5.attrs["status"], h5.attrs["n_written"]) == ("interrupted", 11)
        status = h5[layout.STATUS][:]
        assert status.shape == (19,) and status[11] == layout.STATUS_NOT_WRITTEN and status[12] == 0


def test_compressed_parts_and_a_moved_folder(tmp_path: Path) -> None:
    config = make_config("jungfrau")
    output = tmp_path / "data" / "run.h5"
    output.parent.mkdir()
    writers = start(output, config, 2, compression="bitshuffle-lz4")
    assert [w.rows(0, 8) for w in writers] == [4, 4]
    for w in writers:
        w.close()
    master.finish_master(output, layout.FILE_COMPLETED)
    moved = tmp_path / "elsewhere"
    shutil.copytree(output.parent, moved)
    shutil.rmtree(output.parent)
    cwd = os.getcwd()
    os.chdir("/")
    try:
        check_rows(moved / "run.h5", config, 8)  # relative source paths: found beside the master
    finally:
        os.chdir(cwd)


def test_parts_covering_regions_make_the_full_image(tmp_path: Path) -> None:
    """Two hosts, each with one writer, each holding half of the image's rows."""
    full = make_config("jungfrau", n_modules=2)
    half = make_config("jungfrau")
    output = tmp_path / "run.h5"
    parts = [master.Part(master.part_file_name(output, 0, host), 0, 1, region)
             for host, region in (("daq-a", (0, 0, 512, 1024)), ("daq-b", (512, 0, 512, 1024)))]
    master.create_master(output, parts, image_shape=full.image_shape, image_dtype=full.image_dtype,
                         n_images=6)
    writers = [PartWriter(tmp_path / p.file, half, full, 0, 1, region=p.region) for p in parts]
    assert [w.rows(0, 6) for w in writers] == [6, 6]
    for w in writers:
        w.close()
    assert master.finish_master(output, layout.FILE_COMPLETED) == 6
    check_rows(output, full, 6)


def test_bad_parts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relative"):
        master.Part("/abs/run_part0.h5", 0, 1)
    with pytest.raises(ValueError, match="writer 2 of 2"):
        master.Part("run_part2.h5", 2, 2)
    with pytest.raises(ValueError, match="one part per writer"):
        master.create_master(tmp_path / "m.h5", [master.Part("m_part0.h5", 0, 2)], image_shape=(4, 4),
                             image_dtype="<u2", n_images=1)
    with pytest.raises(ValueError, match="outside the image"):
        master.create_master(tmp_path / "m.h5", [master.Part("m_part0.h5", 0, 1, (2, 0, 4, 4))],
                             image_shape=(4, 4), image_dtype="<u2", n_images=1)
    assert not list(tmp_path.iterdir())  # nothing half-made left behind
