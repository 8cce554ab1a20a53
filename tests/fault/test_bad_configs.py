"""Bad configurations are refused with the reason, before anything starts; a process that cannot start
is reported once as failed and never restarted.

Each config below was once accepted: overlapping modules silently dropped module 0's pixels from
every image marked good; a 2-module detector at port 65535, ``udp_host: not-a-host`` and rings larger
than /dev/shm left ``std-daq up`` running with a receiver restarting forever. Real processes: ``std-daq
up`` as a user runs it, and the supervisor with real children for the failure after start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from daq_backend import ipc
from daq_backend.cli import main as cli_main
from daq_backend.config import ConfigError, parse_config
from daq_backend.ram_buffer import SHM_DIR
from daq_backend.supervisor import EXIT_CANNOT_START, Supervisor, read_status
from daq_backend.testing import assert_no_leftovers, free_udp_base, make_config, wait_for

CLI = (sys.executable, "-m", "daq_backend.cli")


def detector(**fields: Any) -> dict[str, Any]:
    """A valid 2-module Jungfrau config as a dict (unique name, free ports), with ``fields`` changed."""
    data: dict[str, Any] = {
        "detector_name": f"t{uuid.uuid4().hex[:10]}", "detector_type": "jungfrau", "n_modules": 2,
        "bit_depth": 16, "image_pixel_height": 1024, "image_pixel_width": 1024,
        "start_udp_port": free_udp_base(2), "frame_ring_slots": 8, "image_ring_slots": 8,
    }
    data.update(fields)
    return data


def up(config: dict[str, Any], tmp_path: Path, ipc_dir: str) -> subprocess.CompletedProcess[str]:
    """``std-daq up`` of this config, expected to refuse at once (a hang is a failure of the test)."""
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config))
    return subprocess.run([*CLI, "up", str(path), "--rest-port", "0", "--no-writer"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, STD_DAQ_IPC_DIR=ipc_dir))


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The one line ``up`` printed; it must have printed nothing else and exited non-zero."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stderr
    assert len(lines) == 1, done.stderr
    assert done.stdout == ""
    return lines[0]


# (fields changed, field the refusal names, text of the reason)
REFUSED_AT_LOAD = {
    "overlapping modules": (
        {"module_positions": {"0": [0, 0, 1023, 511], "1": [0, 256, 1023, 767]}}, "module_positions",
        "modules 0 and 1 overlap (rows 256..511, columns 0..1023)"),
    "ports beyond 65535": ({"start_udp_port": 65535}, "start_udp_port",
                           "need ports up to 65536, above 65535"),
    "unresolvable udp_host": ({"udp_host": "not-a-host"}, "udp_host", "does not resolve"),
    "two modules with one header id": ({"header_module_ids": {"0": 7, "1": 7}}, "header_module_ids",
                                       "both expect header module id 7"),
}


@pytest.mark.parametrize("case", list(REFUSED_AT_LOAD))
def test_a_bad_config_is_refused_at_load_and_by_up(case: str, ipc_env: str, tmp_path: Path) -> None:
    fields, field, reason = REFUSED_AT_LOAD[case]
    config = detector(**fields)
    with pytest.raises(ConfigError, match=field) as info:
        parse_config(config)
    assert reason in str(info.value)
    line = refusal(up(config, tmp_path, ipc_env))
    assert line.startswith("std-daq: ") and field in line and reason in line
    assert not Path(ipc.status_file(config["detector_name"])).exists()


def test_rings_larger_than_free_shm_are_refused_by_up(ipc_env: str, tmp_path: Path) -> None:
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    slots = 2 * free // (2 * 1024 * 1024) + 8  # 2 MiB images: twice what is free
    config = detector(image_ring_slots=slots)
    parse_config(config)  # a valid file: only this host cannot hold it
    line = refusal(up(config, tmp_path, ipc_env))
    assert "frame_ring_slots/image_ring_slots" in line and f"image_ring_slots (now {slots}" in line
    assert f"of {SHM_DIR}" in line and "MiB are free" in line
    assert_no_leftovers(parse_config(config), ipc_env)


def test_a_taken_udp_port_or_a_foreign_address_is_refused_by_up(ipc_env: str, tmp_path: Path) -> None:
    config = detector()
    taken = config["start_udp_port"] + 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", taken))
        line = refusal(up(config, tmp_path, ipc_env))
    assert f"start_udp_port: UDP 127.0.0.1:{taken} (module 1) is in use" in line
    line = refusal(up(detector(udp_host="192.0.2.1"), tmp_path, ipc_env))  # TEST-NET-1: not this host
    assert "udp_host: 192.0.2.1 is not an address of this host" in line


def test_a_receiver_that_cannot_start_is_failed_once_not_restarted(
    ipc_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port is taken after the checks (another program was faster): the receiver exits with
    EXIT_CANNOT_START and its reason; the supervisor marks it failed, keeps the others running and
    ``std-daq status`` says why."""
    config = make_config("jungfrau", n_modules=2)
    sup = Supervisor(config, backoff_initial=0.05, backoff_max=0.1, status_interval=0.1, preflight=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", config.udp_port(1)))
        sup.start()
        try:
            def failed() -> dict[str, Any] | None:
                sup.poll_once()
                service = next(s for s in sup.status()["services"] if s["name"] == "receiver-1")
                return service if service["failed"] else None

            service = wait_for(failed, "receiver-1 reported failed", 120)
            assert service["exit_code"] == EXIT_CANNOT_START and not service["alive"]
            assert f"cannot bind UDP 127.0.0.1:{config.udp_port(1)}" in service["failed"]
            for _ in range(20):  # it stays down: nothing restarts it
                sup.poll_once()
            services = {s["name"]: s for s in sup.status()["services"]}
            assert services["receiver-1"]["restarts"] == 0 and services["receiver-1"]["pid"] is None
            assert services["receiver-0"]["alive"] and services["assembler"]["alive"]
            sup._write_status()
            status = read_status(ipc.status_file(config.detector_name))
            listed = next(s for s in status["services"] if s["name"] == "receiver-1")
            assert listed["failed"] == service["failed"]
            monkeypatch.setenv("COLUMNS", "300")
            assert cli_main(["status", "--json"]) == 3
            capsys.readouterr()
            assert cli_main(["status"]) == 3
            out = " ".join(capsys.readouterr().out.split())
            assert "failed" in out and "cannot start" in out and str(config.udp_port(1)) in out
        finally:
            sup.shutdown()
    assert_no_leftovers(config, ipc_env)
