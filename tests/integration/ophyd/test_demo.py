"""``std-daq demo`` (the README's first command) runs a real scan on the embedded DAQ and checks it;
its checks do catch a wrong pixel, a missing image and an invalid document."""

from __future__ import annotations

from pathlib import Path

import bluesky.plans as bp
import h5py
import pytest
from bluesky import RunEngine
from ophyd.sim import SynAxis

from daq_backend.demo import check_run, demo_main
from std_daq_ophyd.sim import EmbeddedDaq
from std_daq_ophyd.testing import Recorder, make_detector


def test_demo_runs_and_reports(tmp_path: Path, ipc_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "demo"
    assert demo_main(["--points", "3", "--frames", "2", "--output-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    files = sorted(out_dir.glob("*.h5"))
    assert len(files) == 1
    assert f"file:      {files[0]}" in out
    assert "status:    completed (6 images)" in out and "data:      shape (6, 512, 1024), dtype uint16" in out
    assert "per-image: 6 good" in out and "std-daq demo: OK" in out
    png = out_dir / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main(["--points", "0"]) == 2
    assert "--points and --frames must be >= 1" in capsys.readouterr().err


def test_demo_checks_catch_what_is_wrong(RE: RunEngine, recorder: Recorder, daq: EmbeddedDaq,
                                        data_dir: Path) -> None:
    det = make_detector(daq, data_dir, frames=2)
    RE(bp.scan([det], SynAxis(name="motor"), 0, 1, 2))
    assert check_run(recorder.docs, daq.config, points=2, frames=2) == []
    assert check_run(recorder.docs, daq.config, points=3, frames=2) != []  # an expected image is missing
    path = str(det.writer.file_name.get())
    with h5py.File(path, "r+") as h5:
        h5["/entry/data/data"][1, 10, 10] += 1
    problems = check_run(recorder.docs, daq.config, points=2, frames=2)
    assert any("differ from the simulator's pattern (ids [" in p for p in problems), problems
    broken = [(n, {**d, "uid": 5}) if n == "descriptor" else (n, d) for n, d in recorder.docs]
    assert any("descriptor document invalid" in p for p in check_run(broken, daq.config, 2, 2))
