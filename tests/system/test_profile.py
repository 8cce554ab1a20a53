"""The IPython beamline profile starts non-interactively and runs plans
(``ipython --profile-dir=profile/profile_stddaq -c "RE(count([det], 3))"``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml

from std_daq_ophyd.sim import EmbeddedDaq

PROFILE = Path(__file__).resolve().parents[2] / "profile" / "profile_stddaq"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def beamline(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The shipped beamline YAML, with the data folder moved into the test's tmp_path and the DAQ URL
    pointing at a port nobody listens on."""
    config = yaml.safe_load((PROFILE / "beamline.yaml").read_text())
    config["daq"]["url"] = f"http://127.0.0.1:{free_port()}"
    config["daq"]["data_dir"] = str(tmp_path / "data")
    yield config


def run_profile(config: dict[str, Any], tmp_path: Path, command: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "beamline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "STD_DAQ_BEAMLINE": str(path), "DISPLAY": ""}
    env.pop("MPLBACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "IPython", f"--profile-dir={PROFILE}", "--no-banner", "-c", command],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )


def data_files(config: dict[str, Any]) -> list[Path]:
    return sorted(Path(config["daq"]["data_dir"]).glob("*.h5"))


def test_profile_without_daq_starts_the_embedded_one(beamline: dict[str, Any], tmp_path: Path) -> None:
    command = ("RE(count([det], 3)); print('FILES', docs.files()); "
               "print('TILED', tiled[docs.last[0][1]['uid']]['primary']['det_image'].read().shape)")
    result = run_profile(beamline, tmp_path, command)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"no std-daq at {beamline['daq']['url']}: started an embedded simulated jungfrau DAQ" in out
    assert "devices: det, motor, motor1, motor2" in out
    assert "Error" not in result.stdout, out
    files = data_files(beamline)
    assert len(files) == 1 and f"FILES ['{files[0]}']" in out
    assert "TILED (6, 512, 1024)" in out  # 3 events x frames_per_trigger 2, read back through Tiled
    with h5py.File(files[0], "r") as h5:
        assert h5["/entry/data/data"].shape == (6, 512, 1024)


def test_profile_uses_a_running_daq(beamline: dict[str, Any], tmp_path: Path, daq: EmbeddedDaq) -> None:
    beamline["daq"].update(url=daq.url, embedded_fallback=False)
    beamline["catalog"] = "memory"
    first = daq.control.next_image_id
    result = run_profile(beamline, tmp_path, "RE(scan([det], motor, 0, 1, 2)); summarize(docs.last)")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"std-daq: DAQ at {daq.url}" in out and "embedded" not in out
    assert daq.control.next_image_id == first + 4  # 2 points x 2 images, taken by this DAQ
    files = data_files(beamline)
    assert len(files) == 1
    assert f"file:      {files[0]}" in out and "4 good" in out


def test_profile_names_an_unreachable_daq(beamline: dict[str, Any], tmp_path: Path) -> None:
    beamline["daq"]["embedded_fallback"] = False
    beamline["catalog"] = "memory"
    result = run_profile(beamline, tmp_path, "print('DEVICES' if 'det' in dir() else 'NO DEVICES')")
    out = result.stdout + result.stderr
    assert f"std-daq backend at {beamline['daq']['url']} is unreachable" in out
    assert "NO DEVICES" in out
