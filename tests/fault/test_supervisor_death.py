"""The supervisor dies (``kill -9`` of ``std-daq up``): every process it started is gone within
``FAULT_BOUND``, whatever it does with SIGTERM and whatever it started itself; the rings and sockets
are removed; the file being written stays readable and says it is not being written any more; the
next ``std-daq up`` of the detector stops what a dead supervisor left running and starts cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daq_backend import ipc
from daq_backend.config import DetectorConfig
from daq_backend.messages import FAULT_BOUND
from daq_backend.ram_buffer import shm_path
from daq_backend.supervisor import read_status
from daq_backend.testing import assert_no_leftovers, make_config, shm_segments, wait_for
from daq_backend.writer import layout

CLI = (sys.executable, "-m", "daq_backend.cli")
WAIT_S = 180.0  # start-up on a busy two-core machine


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """PIDs of the live processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def write_config(config: DetectorConfig, folder: str) -> Path:
    path = Path(folder) / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    return path


def wait_status(config: DetectorConfig, n_services: int) -> dict[str, Any]:
    """The status once ``n_services`` services are alive and those that report have reported."""
    path = ipc.status_file(config.detector_name)

    def ready() -> dict[str, Any] | None:
        if not os.path.exists(path):
            return None
        status = read_status(path)
        services = status["services"]
        quiet = {"rest", "sleeper", "parent"}  # services that send no counters
        if len(services) == n_services and all(
                s["alive"] and (s["counters"] or s["name"] in quiet) for s in services):
            return status
        return None

    return wait_for(ready, f"{n_services} services alive and reporting", WAIT_S)


def kill_and_time(pid: int, pids: list[int]) -> float:
    """SIGKILL ``pid``; seconds until every one of ``pids`` is gone (AssertionError beyond the bound)."""
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    wait_for(lambda: all(gone(p) for p in pids), "every child gone after the kill", FAULT_BOUND + 5)
    took = time.monotonic() - start
    assert took <= FAULT_BOUND, f"children lived {took:.1f} s after the supervisor died"
    return took


@pytest.fixture
def detector(ipc_env: str) -> Iterator[tuple[DetectorConfig, Path]]:
    config = make_config("jungfrau", frame_ring_slots=64, image_ring_slots=64)
    path = write_config(config, ipc_env)
    yield config, path
    path.unlink(missing_ok=True)
    assert_no_leftovers(config, ipc_env)


def test_kill_9_of_std_daq_up_during_a_write(detector: tuple[DetectorConfig, Path], ipc_env: str,
                                            tmp_path: Path) -> None:
    """The measured fault: an orphaned writer held the file open for ~30 s. Now every process goes
    within the bound, the guardian removes rings and sockets, the file is closed and readable, and
    ``std-daq status`` says the supervisor died."""
    config, path = detector
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    up = subprocess.Popen([*CLI, "up", str(path), "--rest-port", "0", "--status-interval", "0.2",
                           "--log-level", "WARNING"], env=env)
    sender = writer = None
    output = tmp_path / "run.h5"
    try:
        status = wait_status(config, 4)
        sender = subprocess.Popen([*CLI, "simulate", str(path), "--rate", "50", "--n-images", "1000000",
                                   "--no-progress"], env=env, stdout=subprocess.DEVNULL)
        writer = subprocess.Popen([*CLI, "write", "--n-images", "100000", "--output", str(output),
                                   "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def rows() -> int:
            try:
                with h5py.File(output, "r", swmr=True) as h5:
                    return layout.written_rows(h5)
            except OSError:
                return 0

        wait_for(lambda: rows() >= 10, "the write under way", WAIT_S)
        children = [s["pid"] for s in read_status(ipc.status_file(config.detector_name))["services"]]
        guardian = status["guardian_pid"]
        kill_and_time(up.pid, children)
        up.wait(30)
        wait_for(lambda: gone(guardian), "the guardian done", FAULT_BOUND)
    finally:
        for proc in (sender, writer, up):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
    # the guardian removed rings and sockets at once and said what happened in the status file
    assert shm_segments(config.detector_name) == []
    det = config.detector_name
    for address in (ipc.image_metadata_address(det),
                    ipc.writer_agent_address(det), ipc.writer_status_address(det), ipc.stats_address(det),
                    ipc.supervisor_address(det)):
        assert not os.path.exists(address.removeprefix("ipc://")), address
    status = read_status(ipc.status_file(det))
    assert status["stale"] and "the supervisor died" in status["ended"]
    assert not any(s["alive"] for s in status["services"])
    shown = subprocess.run([*CLI, "status", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 3 and "STALE" in shown.stdout and "the supervisor died" in shown.stdout
    # the file: closed (not "writing"), readable, its counter equal to its complete rows
    with h5py.File(output, "r") as h5:
        assert h5.attrs["status"] != "writing"
        n = int(h5.attrs["n_written"])
        assert n >= 10 and layout.written_rows(h5) == n
        ids = h5[layout.IMAGE_ID][:n].astype(np.int64)
        assert np.all(np.diff(ids) == 1)
    Path(ipc.status_file(det)).unlink()


# A service that ignores SIGTERM, and one that starts a child of its own ignoring SIGTERM too.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
PARENT = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
          "time.sleep(3600)")

SUPERVISOR = """
import json, sys
from daq_backend.config import parse_config
from daq_backend.supervisor import ServiceSpec, Supervisor
config = parse_config(json.load(open(sys.argv[1])))
stubborn, parent = sys.argv[2], sys.argv[3]
extra = [ServiceSpec("sleeper", argv=(sys.executable, "-c", stubborn)),
         ServiceSpec("parent", argv=(sys.executable, "-c", parent, stubborn))]
Supervisor(config, sys.argv[1], extra, status_interval=0.2, backoff_initial=3600.0).run()
"""


def test_processes_that_ignore_sigterm_and_their_own_children_go_too(
    detector: tuple[DetectorConfig, Path], ipc_env: str
) -> None:
    config, path = detector
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(path), STUBBORN, PARENT], env=env)
    try:
        status = wait_status(config, 4)
        pids = {s["name"]: s["pid"] for s in status["services"]}
        grandchild = wait_for(lambda: [p for p in group_members(pids["parent"]) if p != pids["parent"]],
                              "the parent's own child", WAIT_S)
        took = kill_and_time(sup.pid, [*pids.values(), *grandchild])
        sup.wait(30)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait(30)
    # SIGTERM was ignored: the guardian waited its grace period, then SIGKILLed them
    assert took <= FAULT_BOUND
    wait_for(lambda: gone(status["guardian_pid"]), "the guardian done", FAULT_BOUND)
    ended = read_status(ipc.status_file(config.detector_name))["ended"]
    assert "SIGKILLed after" in ended and "sleeper" in ended and "what parent started" in ended
    Path(ipc.status_file(config.detector_name)).unlink()


def test_the_next_up_stops_what_a_dead_supervisor_left_running(
    detector: tuple[DetectorConfig, Path], ipc_env: str
) -> None:
    """Supervisor and guardian both SIGKILLed: left are a receiver that could not act on its death
    signal (stopped), a service ignoring SIGTERM, a process one of the services started, and a ring
    whose owner was killed. The next ``std-daq up`` stops every one of them (else its receiver could
    not bind the port), replaces the leftovers and runs; stopped cleanly, it leaves nothing behind."""
    config, path = detector
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    first = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(path), STUBBORN, PARENT], env=env)
    up: subprocess.Popen[bytes] | None = None
    pids: dict[str, int] = {}
    try:
        status = wait_status(config, 4)
        pids = {s["name"]: s["pid"] for s in status["services"]}
        grandchild, = wait_for(lambda: [p for p in group_members(pids["parent"]) if p != pids["parent"]],
                               "the parent's own child", WAIT_S)
        pids["grandchild"] = grandchild
        os.kill(pids["assembler"], signal.SIGKILL)  # its image ring stays (backoff: not restarted)
        wait_for(lambda: gone(pids["assembler"]), "the assembler gone", WAIT_S)
        ring = shm_path(ipc.image_ring_name(config.detector_name))
        assert ring.exists()
        os.kill(pids["receiver-0"], signal.SIGSTOP)  # cannot act on SIGTERM until continued
        os.kill(status["guardian_pid"], signal.SIGKILL)
        wait_for(lambda: gone(status["guardian_pid"]), "the guardian gone", WAIT_S)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        wait_for(lambda: gone(pids["parent"]), "the parent gone (its death signal)", WAIT_S)
        assert not gone(pids["receiver-0"]) and not gone(pids["sleeper"]) and not gone(grandchild)
        assert read_status(ipc.status_file(config.detector_name))["stale"]

        up = subprocess.Popen([*CLI, "up", str(path), "--no-writer", "--rest-port", "0", "--status-interval",
                               "0.2", "--log-level", "WARNING"], env=env)
        status = wait_status(config, 2)
        assert all(gone(p) for p in pids.values())  # the orphans were stopped first
        receiver = next(s for s in status["services"] if s["name"] == "receiver-0")
        assert receiver["alive"] and receiver["restarts"] == 0 and receiver["pid"] != pids["receiver-0"]
        assert ring.exists()  # made anew by the new assembler
    finally:
        for pid in pids.values():
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        if first.poll() is None:
            first.kill()
            first.wait(30)
        if up is not None:
            up.send_signal(signal.SIGINT)
            assert up.wait(60) == 0
    assert not os.path.exists(ipc.status_file(config.detector_name))
