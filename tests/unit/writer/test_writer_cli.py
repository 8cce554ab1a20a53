"""``std-daq write`` / ``std-daq listen`` (``writer.client``) against a writer on an embedded hub."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from daq_backend.testing import wait_for
from daq_backend.testing.writer import WAIT_S, Harness
from daq_backend.writer import client, layout


def _write(h: Harness, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    url = h.broker_url
    code = client.write_main([*args, "--broker-url", url, "--no-progress"], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_write_main_success_failure_and_no_agent(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    h.start_writer()
    h.assembler.start(rate_hz=100)
    path = h.tmp_path / "cli.h5"
    code, out, err = _write(h, "--n-images", "7", "--output", str(path), "--detector", h.tag,
                            "--metadata", '{"sample": "Si"}', "--compression", "bitshuffle-lz4")
    assert code == 0, err
    result = json.loads(out)
    assert (result["output_file"], result["n_written"], result["status"]) == (str(path), 7, "completed")
    with h5py.File(path, "r") as h5:
        assert h5[layout.DATA].shape[0] == 7 and h5["entry"].attrs["sample"] == "Si"

    monkeypatch.setenv(client.DETECTOR_ENV, h.tag)  # the tag from the environment
    monkeypatch.chdir(h.tmp_path)
    code, out, err = _write(h, "--n_images", "3", "--output", "cli.h5")  # relative: made absolute
    assert code == 2 and out == ""
    assert err.strip() == f"std-daq write: {path} already exists: --overwrite replaces it"  # the CLI's flag
    start = h.assembler.next_id + 5
    code, out, err = _write(h, "--n-images", "3", "--output", "cli.h5", "--overwrite",
                            "--start-id", str(start), "--timeout", "60")
    assert code == 0, err
    with h5py.File(path, "r") as h5:
        assert list(h5[layout.IMAGE_ID]) == [start, start + 1, start + 2]

    code, out, err = _write(h, "--n-images", "3", "--output", "x.h5", "--detector", "nobody-here")
    assert code == 2 and "no writer agent serves detector 'nobody-here'" in err
    code, out, err = _write(h, "--n-images", "0", "--output", "x.h5")
    assert code == 2 and "n_images: Input should be greater than or equal to 1" in err
    code, out, err = _write(h, "--n-images", "2", "--output", "x.h5", "--metadata", "{oops")
    assert code == 2 and "--metadata is not valid JSON" in err
    code, out, err = _write(h, "--n-images", "2", "--output", "x.h5", "--metadata", "[1]")
    assert code == 2 and "metadata: Input should be a valid dictionary" in err


def test_the_detector_is_found_when_only_one_is_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(client.DETECTOR_ENV, raising=False)
    monkeypatch.setattr(client, "running_detectors", lambda: [])
    with pytest.raises(client.CliError, match="no detector is up on this host"):
        client.resolve_detector(None)
    monkeypatch.setattr(client, "running_detectors", lambda: ["jf1"])
    assert client.resolve_detector(None) == "jf1"
    monkeypatch.setattr(client, "running_detectors", lambda: ["jf1", "eg2"])
    with pytest.raises(client.CliError, match=r"several detectors are up \(jf1, eg2\)"):
        client.resolve_detector(None)
    assert client.resolve_detector("given") == "given"
    monkeypatch.setenv(client.DETECTOR_ENV, "from-env")
    assert client.resolve_detector(None) == "from-env"
    # Status files as the supervisor writes them: only a live supervisor's detector counts.
    monkeypatch.undo()
    monkeypatch.setenv("STD_DAQ_IPC_DIR", str(tmp_path))
    for name, pid in (("alive-det", os.getpid()), ("dead-det", 2**22 + 12345)):
        (tmp_path / f"std-daq-{name}-status.json").write_text(json.dumps(
            {"detector": name, "supervisor_pid": pid, "updated": 4e9, "interval": 1.0, "services": []}))
    assert client.running_detectors() == ["alive-det"]


def _rows(path: Path) -> int:
    with layout.open_image_file(path) as h5:
        return layout.written_rows(h5)


_CLI = "import sys; from daq_backend.writer.client import {main}; sys.exit({main}(sys.argv[1:]))"


def test_ctrl_c_kills_the_request_and_the_file_stays_valid(harness: Harness) -> None:
    h = harness
    h.start_writer()
    h.assembler.start(rate_hz=100)
    path = h.tmp_path / "ctrl-c.h5"
    url = h.broker_url
    listener = subprocess.Popen([sys.executable, "-c", _CLI.format(main="listen_main"), h.tag, "--broker-url",
                                 url], stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None
    first = listener.stdout.readline()  # printed once it is subscribed: no status can pass it by
    proc = subprocess.Popen([sys.executable, "-c", _CLI.format(main="write_main"), "--n-images", "100000",
                             "--output", str(path), "--detector", h.tag, "--broker-url", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: path.exists() and _rows(path) >= 5, "5 images in the file")
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "killing the request" in err and "img" in err  # the tqdm bar was on stderr
    assert "writer_agent: Interrupted: killed after " in err and f"file {path} is valid" in err
    with h5py.File(path, "r") as h5:
        assert h5.attrs["status"] == "interrupted" and h5.attrs["n_written"] >= 5
    os.kill(listener.pid, signal.SIGINT)
    rest, _ = listener.communicate(timeout=WAIT_S)
    listened = first + rest
    assert listener.returncode == 0
    assert f"Listening for status messages on tag {h.tag!r}" in listened
    assert "writer_agent" in listened and "Interrupted: killed after" in listened
