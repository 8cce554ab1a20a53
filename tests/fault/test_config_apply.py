"""A new config is applied to the running pipeline or refused with the reason, never "deployed"
without effect: ``POST /daq/config`` and a ``dr`` change on ``/detector`` against ``std-daq up``
(real processes, real UDP). When the answer comes the new config is live (the receivers listen where
it says, images of the new geometry are written); a refused one leaves the old config running."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests

from daq_backend import ipc
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.messages import FAULT_BOUND
from daq_backend.simulator.pattern import expected_image
from daq_backend.supervisor import read_status
from daq_backend.testing import (
    EIGER_HALF_POSITIONS,
    assert_no_leftovers,
    free_tcp_port,
    free_udp_base,
    make_config,
    wait_for,
)
from daq_backend.writer import layout

CLI = (sys.executable, "-m", "daq_backend.cli")
WAIT_S = 180.0


@dataclass
class Up:
    """``std-daq up`` of one detector, its REST URL and its config file."""

    config: DetectorConfig
    path: Path
    url: str
    proc: subprocess.Popen[bytes]
    data: Path

    def services(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in read_status(ipc.status_file(self.config.detector_name))["services"]}

    def post(self, route: str, body: Any) -> requests.Response:
        return requests.post(f"{self.url}{route}", json=body, timeout=WAIT_S)

    def daq_config(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.url}/daq/config", timeout=WAIT_S).json()["config"])

    def acquire(self, n: int, name: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Write the next ``n`` images while the simulated detector sends them: (data, ids, request)."""
        output = self.data / name
        answer = self.post("/write_async", {"n_images": n, "output_file": str(output), "timeout": 60})
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["request_id"]
        # the writer takes images once its file is open (it then reports progress): "the next n images"
        wait_for(lambda: "request_progress" in self.request(request_id)["services"].values(),
                 "the writer taking images", WAIT_S)
        answer = self.post(f"/detector/{self.config.detector_name}",
                           {"config": {"frames": n, "period": 0.02}, "cmd": "START"})
        assert answer.status_code == 200, answer.text
        final = wait_for(lambda: (r := self.request(request_id))["state"] in ("completed", "failed",
                                                                               "interrupted") and r,
                         "the write ended", WAIT_S)
        with h5py.File(output, "r") as h5:
            n_rows = layout.written_rows(h5)
            assert int(h5.attrs["n_written"]) == n_rows == final["n_written"]  # file and REST agree
            return h5[layout.DATA][:n_rows], h5[layout.IMAGE_ID][:n_rows], final

    def request(self, request_id: str) -> dict[str, Any]:
        return dict(requests.get(f"{self.url}/requests/{request_id}", timeout=WAIT_S).json())


def start_up(config: DetectorConfig, folder: str, data: Path) -> Up:
    path = Path(folder) / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    port = free_tcp_port()
    proc = subprocess.Popen([*CLI, "up", str(path), "--rest-port", str(port), "--status-interval", "0.2",
                             "--log-level", "WARNING"], env=dict(os.environ, STD_DAQ_IPC_DIR=folder))
    up = Up(config, path, f"http://127.0.0.1:{port}", proc, data)

    def ready() -> bool:
        if not os.path.exists(ipc.status_file(config.detector_name)):
            return False
        services = up.services()
        expected = len(config.required_modules) + 4  # receivers, assembler, h5 writer, agent, REST
        if len(services) != expected or not all(s["alive"] for s in services.values()):
            return False
        try:
            return requests.get(f"{up.url}/health", timeout=5).ok
        except requests.ConnectionError:
            return False

    wait_for(ready, "std-daq up ready", WAIT_S)
    return up


@pytest.fixture
def up(request: pytest.FixtureRequest, ipc_env: str, tmp_path: Path) -> Iterator[Up]:
    if getattr(request, "param", None) == "eiger":
        config = make_config("eiger", n_modules=2, image_pixel_height=514, image_pixel_width=514,
                             module_positions=EIGER_HALF_POSITIONS, frame_ring_slots=32, image_ring_slots=32)
    else:
        config = make_config("jungfrau", frame_ring_slots=32, image_ring_slots=32)
    data = tmp_path / "data"
    data.mkdir()
    daq = start_up(config, ipc_env, data)
    try:
        yield daq
    finally:
        daq.proc.send_signal(signal.SIGINT)
        assert daq.proc.wait(60) == 0
        daq.path.unlink()
        assert_no_leftovers(daq.config, ipc_env)


def port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE, exc
            return True
    return False


def assert_pattern(config: DetectorConfig, data: np.ndarray, ids: np.ndarray, n: int) -> None:
    assert len(ids) == n and np.all(np.diff(ids.astype(np.int64)) == 1)
    for image, image_id in zip(data, ids, strict=True):
        np.testing.assert_array_equal(image, expected_image(config, int(image_id)))


def test_new_port_and_host_are_live_when_the_answer_comes(up: Up) -> None:
    old_port = up.config.start_udp_port
    new_port = free_udp_base(1)
    before = up.services()
    answer = up.post("/daq/config", {"start_udp_port": new_port, "udp_host": "0.0.0.0"})
    assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
    assert "the config is live" in answer.json()["message"].lower()
    # live now, not eventually: the receiver holds the new port on every interface, the old is free
    assert port_taken("127.0.0.1", new_port) and not port_taken("127.0.0.1", old_port)
    assert (up.daq_config()["start_udp_port"], up.daq_config()["udp_host"]) == (new_port, "0.0.0.0")
    saved = json.loads(up.path.read_text())  # the next `std-daq up` of the file starts the same
    assert (saved["start_udp_port"], saved["udp_host"]) == (new_port, "0.0.0.0")
    after = up.services()
    assert after["receiver-0"]["pid"] != before["receiver-0"]["pid"]  # only the receiver restarted:
    for name in ("assembler", "h5-writer", "writer-agent", "rest"):  # the others read no port or host
        assert after[name]["pid"] == before[name]["pid"] and after[name]["alive"], name
    assert "(restarted: receiver-0)" in answer.json()["message"]
    deployment = requests.get(f"{up.url}/daq/deployment", timeout=WAIT_S).json()["deployment"]
    assert deployment["status"] == "SUCCESS" and "live" in deployment["message"]
    # images reach the file through the new port (the simulated detector follows the config)
    new = parse_config({**up.config.to_json_dict(), "start_udp_port": new_port, "udp_host": "0.0.0.0"})
    data, ids, final = up.acquire(5, "after.h5")
    assert final["state"] == "completed"
    assert_pattern(new, data, ids, 5)


def test_refused_configs_leave_the_old_one_running(up: Up) -> None:
    before = up.services()
    config_before, file_before = up.daq_config(), up.path.read_text()
    # 1. refused by the checks before anything stops: the port is taken by another process
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        taken = squatter.getsockname()[1]
        answer = up.post("/daq/config", {"start_udp_port": taken})
    assert answer.json()["status"] == "error"
    assert f"start_udp_port: UDP port {taken} on 127.0.0.1 is in use" in answer.json()["message"]
    assert {n: s["pid"] for n, s in up.services().items()} == {n: s["pid"] for n, s in before.items()}
    # 2. refused because a restarted process could not start: the previous config is restored
    answer = up.post("/daq/config", {"pedestal_gain_file": "/nonexistent/pedestals.h5"})
    message = answer.json()["message"]
    assert answer.json()["status"] == "error" and "config not applied" in message
    assert "assembler exited" in message and "the previous config was restored" in message
    for refused in (1, 2):
        assert up.daq_config() == config_before, refused
        assert up.path.read_text() == file_before, refused
    services = up.services()
    assert all(s["alive"] for s in services.values())
    deployment = requests.get(f"{up.url}/daq/deployment", timeout=WAIT_S).json()["deployment"]
    assert deployment["status"] == "ERROR" and "not applied" in deployment["message"]
    # the old config runs: images of the old geometry on the old port
    data, ids, final = up.acquire(4, "still.h5")
    assert final["state"] == "completed"
    assert_pattern(up.config, data, ids, 4)


@pytest.mark.parametrize("up", ["eiger"], indirect=True)
def test_a_dr_change_on_the_detector_is_applied_to_the_daq(up: Up) -> None:
    """The seed's ``POST /detector {"config": {"dr": 32}}``: the detector sends 32-bit pixels, so the
    DAQ's bit_depth follows before the answer comes; the next images are 32-bit, pixel for pixel."""
    answer = up.post("/detector", {"det_name": up.config.detector_name, "config": {"dr": 32}})
    assert answer.status_code == 200, answer.text
    response = answer.json()["response"]
    assert response.startswith("request_success (DAQ bit_depth=32: The config is live"), response
    assert up.daq_config()["bit_depth"] == 32 and json.loads(up.path.read_text())["bit_depth"] == 32
    detector = requests.get(f"{up.url}/detector/{up.config.detector_name}", timeout=WAIT_S).json()
    assert detector["dr"] == 32
    restarted = response.split("(restarted: ", 1)[1].split(")", 1)[0].split(", ")
    assert sorted(restarted) == ["assembler", "h5-writer", "receiver-0", "receiver-1", "writer-agent"]
    new = parse_config({**up.config.to_json_dict(), "bit_depth": 32})
    data, ids, final = up.acquire(3, "dr32.h5")
    assert final["state"] == "completed" and data.dtype == np.uint32
    assert_pattern(new, data, ids, 3)
    # within the bound, every process of the new config reports (status agrees with the answer)
    wait_for(lambda: all(s["alive"] for s in up.services().values()), "every service alive", FAULT_BOUND)
