"""The command line and the README tried as a new user would: the real commands as subprocesses.

A write killed by SIGTERM or SIGHUP ends its request as Ctrl-C does (and the next write is not queued
behind it); ``write`` says when no image comes; the README's quick start runs top to bottom; bad
configs are one line; a second ``up`` refuses before claiming anything; ``status`` is never cut and
survives a closed pipe; the error messages name the command line's own flags and the way out."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daq_backend import ipc
from daq_backend.config import DetectorConfig
from daq_backend.ram_buffer import RingBuffer
from daq_backend.simulator.pattern import expected_image
from daq_backend.supervisor import read_status
from daq_backend.testing import assert_no_leftovers, make_config, shm_segments, wait_for
from daq_backend.writer import layout
from daq_backend.writer.client import NO_IMAGE_HINT

REPO = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "daq_backend.cli")
WAIT_S = 180.0


@dataclass
class Up:
    config: DetectorConfig
    path: Path
    env: dict[str, str]
    proc: subprocess.Popen[str]

    def status(self) -> dict[str, Any]:
        return read_status(ipc.status_file(self.config.detector_name))


def start_up(config: DetectorConfig, folder: str, *args: str) -> Up:
    path = Path(folder) / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    env = dict(os.environ, STD_DAQ_IPC_DIR=folder)
    proc = subprocess.Popen([*CLI, "up", str(path), "--status-interval", "0.2", "--log-level", "WARNING",
                             *args], env=env, stderr=subprocess.PIPE, text=True)
    up = Up(config, path, env, proc)
    n = len(config.required_modules) + (1 if "--no-writer" in args else 3)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"std-daq up exited: {proc.stderr.read() if proc.stderr else ''}")
        if not os.path.exists(ipc.status_file(config.detector_name)):
            return False
        services = up.status()["services"]
        return len(services) == n and all(s["alive"] and s["counters"] for s in services)

    wait_for(ready, "std-daq up ready", WAIT_S)
    return up


def stop_up(up: Up) -> str:
    up.proc.send_signal(signal.SIGINT)
    _, err = up.proc.communicate(timeout=60)
    assert up.proc.returncode == 0, err
    return err


@pytest.fixture
def up(ipc_env: str) -> Iterator[Up]:
    """``std-daq up`` of a one-module Jungfrau without REST API (the CLI reaches it on the broker)."""
    daq = start_up(make_config("jungfrau", frame_ring_slots=32, image_ring_slots=32), ipc_env,
                   "--rest-port", "0")
    try:
        yield daq
    finally:
        stop_up(daq)
        daq.path.unlink()
        assert_no_leftovers(daq.config, ipc_env)


def read_until(stream: Any, pattern: str, timeout: float) -> str:
    """Lines of ``stream`` until one matches ``pattern`` (AssertionError after ``timeout``)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            line = stream.readline()
            if not line:
                break
            seen += line
            if re.search(pattern, line):
                return seen
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got:\n{seen}")


def file_state(path: Path) -> tuple[str, int]:
    with h5py.File(path, "r") as h5:
        return str(h5.attrs["status"]), layout.written_rows(h5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_write_ended_by_sigterm_or_sighup_ends_its_request(up: Up, tmp_path: Path, sig: int) -> None:
    """No image comes (nothing sends): ``write`` says so; then a signal as ``timeout`` or a closed
    terminal sends it kills the request like Ctrl-C. The next write starts at once and gets only its
    own images; the first file stays closed with none."""
    first = tmp_path / "first.h5"
    write = subprocess.Popen([*CLI, "write", "--n-images", "5", "--output", str(first), "--no-progress"],
                             env=up.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = read_until(write.stderr, "no image yet", NO_IMAGE_HINT + WAIT_S)
        assert "std-daq simulate" in said and "--timeout" in said
        write.send_signal(sig)
        out, err = write.communicate(timeout=WAIT_S)
    finally:
        if write.poll() is None:
            write.kill()
            write.wait()
    assert write.returncode == 1, err
    assert f"{signal.Signals(sig).name}: killing the request" in err
    assert file_state(first) == ("interrupted", 0)

    second = tmp_path / "second.h5"
    write = subprocess.Popen([*CLI, "write", "--n-images", "3", "--output", str(second), "--no-progress"],
                             env=up.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = None
    try:
        # the writer agent took the request at once (nothing queued in front of it)
        wait_for(lambda: second.exists(), "the second file opened", WAIT_S)
        sender = subprocess.Popen([*CLI, "simulate", str(up.path), "--rate", "20", "--n-images", "100000",
                                   "--no-progress"], env=up.env, stdout=subprocess.DEVNULL)
        out, err = write.communicate(timeout=WAIT_S)
    finally:
        for proc in (write, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert write.returncode == 0, err
    assert file_state(second) == ("completed", 3)
    assert file_state(first) == ("interrupted", 0)  # nothing was ever added to the killed request
    with h5py.File(second, "r") as h5:
        for image, image_id in zip(h5[layout.DATA][:], h5[layout.IMAGE_ID][:], strict=True):
            np.testing.assert_array_equal(image, expected_image(up.config, int(image_id)))


def readme_block(heading: str, index: int) -> str:
    """The ``index``-th bash block of the README section ``heading``."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[index]


def test_readme_quick_start_runs_top_to_bottom(ipc_env: str, tmp_path: Path) -> None:
    """Terminal 1's ``up``, then terminal 2's block as written, with the venv on PATH. Substituted:
    the config (same detector, free ports, small rings, so tests can run side by side), the home of the
    data root (``XDG_DATA_HOME``) and the REST port."""
    terminal_1 = readme_block("Quick start at a beamline", 0)
    terminal_2 = readme_block("Quick start at a beamline", 1)
    original = json.loads((REPO / "configs/jungfrau_1m.json").read_text())
    config = make_config("jungfrau", frame_ring_slots=64, image_ring_slots=64,
                         module_positions=original["module_positions"])
    config_path = tmp_path / "jungfrau_1m.json"
    config_path.write_text(json.dumps(config.to_json_dict()))
    xdg = tmp_path / "xdg"  # this test's own data root: $XDG_DATA_HOME/std-daq
    data = xdg / "std-daq"

    def adapt(block: str) -> str:
        return (block.replace("configs/jungfrau_1m.json", str(config_path))
                .replace("~/.local/share/std-daq", str(data)))

    up_line = adapt(terminal_1.strip().splitlines()[0].split("#")[0]).strip()
    assert up_line.startswith("std-daq up ")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env, PATH=path, XDG_DATA_HOME=str(xdg))
    env.pop("STD_DAQ_OUTPUT_ROOTS", None)
    data.mkdir(parents=True)
    up = subprocess.Popen(["bash", "-c", f"exec {up_line} --rest-port 0"], env=env, cwd=tmp_path,
                          stderr=subprocess.PIPE, text=True)
    try:
        read_until(up.stderr, "up \\(", WAIT_S)  # what the user waits for in terminal 1
        wait_for(lambda: all(s["alive"] and s["counters"] for s in
                             read_status(ipc.status_file(config.detector_name))["services"]),
                 "every process reporting", WAIT_S)
        script = "set -e\n" + adapt(terminal_2)
        run = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=WAIT_S)
    finally:
        up.send_signal(signal.SIGINT)
        up.communicate(timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert file_state(data / "run1.h5") == ("completed", 100)
    assert (tmp_path / "now.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert config.detector_name in run.stdout  # status showed the detector
    assert_no_leftovers(config, ipc_env)


def test_readme_says_how_to_get_std_daq_on_path_and_documents_the_environment() -> None:
    text = (REPO / "README.md").read_text()
    assert "source .venv/bin/activate" in text and ".venv/bin/std-daq" in text
    table = text.split("### Environment variables", 1)[1].split("\n\n", 2)[1]
    for variable in ("STD_DAQ_IPC_DIR", "STD_DAQ_SHM_PREFIX", "STD_DAQ_DETECTOR"):
        assert f"| `{variable}` |" in table, variable
    ipython = text.split("Then in IPython", 1)[1].split("```", 2)[1]
    assert "file_name.get()" in ipython  # says where the file went
    assert "/tmp/std-daq-data" not in text  # no folder shared by every user of the host


@pytest.mark.parametrize("command", [
    ["preview", "{bad}", "--output", "x.png"], ["simulate", "{bad}", "--rate", "1", "--n-images", "1"],
    ["live-stream", "{bad}"], ["stream-send", "{bad}", "--address", "tcp://127.0.0.1:1"],
    ["stream-recv", "{bad}", "--address", "tcp://127.0.0.1:1"], ["writer-agent", "{bad}"],
    ["h5-writer", "{bad}"], ["rest", "{bad}"], ["up", "{bad}"], ["status", "{bad}"],
], ids=lambda c: c[0])
def test_a_bad_config_is_one_line_for_every_command(command: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"detector_name": "x", "detector_type": "jungfrau", "n_modules": 1}))
    done = subprocess.run([*CLI, *(str(bad) if a == "{bad}" else a for a in command)], capture_output=True,
                          text=True, timeout=WAIT_S, env=dict(os.environ, STD_DAQ_IPC_DIR=str(tmp_path)))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("std-daq") and "bit_depth: missing (required)" in lines[-1], done.stderr


def test_a_second_up_refuses_before_saying_it_is_up(ipc_env: str) -> None:
    config = make_config("jungfrau", frame_ring_slots=32, image_ring_slots=32)
    first = start_up(config, ipc_env, "--no-writer", "--rest-port", "0")
    try:
        second = subprocess.run([*CLI, "up", str(first.path), "--no-writer", "--rest-port", "0"],
                                env=first.env, capture_output=True, text=True, timeout=WAIT_S)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"std-daq up: {config.detector_name} is already up (supervisor pid {first.proc.pid}); a second "
            "instance would take over its ports, rings and sockets"]
        assert first.status()["supervisor_pid"] == first.proc.pid  # the first one untouched
    finally:
        err = stop_up(first)
    assert f"{config.detector_name} up (" in err  # the first one did say so, once it was up
    first.path.unlink()
    assert_no_leftovers(config, ipc_env)


def test_status_is_never_cut_and_a_closed_pipe_is_quiet(up: Up) -> None:
    env = {k: v for k, v in up.env.items() if k not in ("COLUMNS", "LINES")}
    shown = subprocess.run([*CLI, "status"], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert shown.returncode == 0, shown.stderr
    assert "…" not in shown.stdout  # nothing cut to 80 columns
    for name in ("receiver-0", "assembler", "h5-writer", "writer-agent"):
        row = next(line for line in shown.stdout.splitlines() if f" {name} " in line)
        assert "yes" in row, row
    assert max(len(line) for line in shown.stdout.splitlines()) > 80
    # the reader goes away before the output is written (`std-daq status --json | head -1` on a big
    # status): no BrokenPipeError, no traceback
    proc = subprocess.Popen([*CLI, "status", "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(WAIT_S)
    assert err == "" and proc.returncode in (0, 1), err
    head = subprocess.run(["bash", "-c", f"{shlex.join(CLI)} status --json | head -1"], env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert head.stdout == "[\n" and head.stderr == ""


def test_write_errors_name_the_way_out(ipc_env: str, tmp_path: Path) -> None:
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    env.pop("STD_DAQ_DETECTOR", None)
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"")
    done = subprocess.run([*CLI, "write", "--n-images", "1", "--output", str(existing)], env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 2
    assert done.stderr.strip() == f"std-daq write: {existing} already exists: --overwrite replaces it"
    done = subprocess.run([*CLI, "write", "--n-images", "1", "--output", str(tmp_path / "new.h5")], env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 2
    assert "no detector is up on this host" in done.stderr and "`std-daq up CONFIG`" in done.stderr
    assert ipc_env in done.stderr  # where it looked


def test_shm_leftover_checks_honour_the_prefix(ipc_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``STD_DAQ_SHM_PREFIX`` set, the tests' leftover check sees (and so can miss) real rings."""
    monkeypatch.setenv("STD_DAQ_SHM_PREFIX", f"p{os.getpid()}-")
    config = make_config("jungfrau")
    ring = RingBuffer.create(ipc.image_ring_name(config.detector_name), 4096, 4)
    try:
        assert shm_segments(config.detector_name) == [ipc.image_ring_name(config.detector_name)]
        with pytest.raises(AssertionError):
            assert_no_leftovers(config, ipc_env)
    finally:
        ring.close()
    assert shm_segments(config.detector_name) == []
