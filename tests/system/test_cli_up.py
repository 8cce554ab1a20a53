"""``std-daq up`` as a user runs it: readout, writer agent and REST API of one detector on the embedded
broker; ``std-daq write`` from another process reaches it with no flags; Ctrl-C stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import requests

from daq_backend import ipc
from daq_backend.simulator.pattern import expected_image
from daq_backend.supervisor import read_status
from daq_backend.testing import assert_no_leftovers, free_tcp_port, healthy, make_config, pid_alive, wait_for

CLI = (sys.executable, "-m", "daq_backend.cli")


def test_up_serves_cli_and_rest_writes_then_stops_cleanly(ipc_env: str, tmp_path: Path) -> None:
    config = make_config("jungfrau", frame_ring_slots=64, image_ring_slots=64)
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    up = subprocess.Popen([*CLI, "up", str(path), "--rest-port", str(port), "--status-interval", "0.2"],
                          env=env)
    sender: subprocess.Popen[bytes] | None = None
    child_pids: list[int] = []
    try:
        status_path = ipc.status_file(config.detector_name)

        def services_up() -> list[int] | None:
            if not os.path.exists(status_path):
                return None
            services = read_status(status_path)["services"]
            names = {s["name"] for s in services}
            if names == {"receiver-0", "assembler", "h5-writer", "writer-agent", "rest"} and all(
                    s["alive"] for s in services):
                return [s["pid"] for s in services]
            return None

        child_pids = wait_for(services_up, "receiver, assembler, h5 writer, writer agent and rest alive", 120)
        wait_for(lambda: healthy(url), "REST API healthy", 120)

        # the detector runs continuously; every write takes the next N images, whatever their ids
        sender = subprocess.Popen([*CLI, "simulate", str(path), "--rate", "40", "--n-images", "1000000",
                                   "--no-progress"], env=env, stdout=subprocess.DEVNULL)
        cli_file = tmp_path / "cli.h5"
        done = subprocess.run([*CLI, "write", "--n-images", "8", "--output", str(cli_file), "--no-progress",
                               "--timeout", "120"], env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        rest_file = tmp_path / "rest.h5"
        answer = requests.post(f"{url}/write_sync", json={"output_file": str(rest_file), "n_images": 5},
                               timeout=180)
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"]["state"] == "completed"

        for file, n in ((cli_file, 8), (rest_file, 5)):
            with h5py.File(file, "r") as f:
                assert f.attrs["status"] == "completed"
                ids = f["/entry/data/image_id"][:]
                assert len(ids) == n and np.all(np.diff(ids.astype(np.int64)) == 1)
                assert np.all(f["/entry/data/status"][:] == 0)
                data = f["/entry/data/data"]
                for row, image_id in enumerate(ids):
                    np.testing.assert_array_equal(data[row], expected_image(config, int(image_id)))
    finally:
        if sender is not None:
            sender.kill()
            sender.wait(30)
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    assert child_pids and not any(pid_alive(p) for p in child_pids)
    assert_no_leftovers(config, ipc_env)


def test_up_runs_the_optional_streams_of_the_topology(ipc_env: str, tmp_path: Path) -> None:
    """``--stream-send`` and ``--live-stream`` add their processes to the detector's; stopped with it."""
    config = make_config("jungfrau", frame_ring_slots=16, image_ring_slots=16)
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    live = f"ipc://{ipc_env}/std-daq-{config.detector_name}-viewers"
    send = f"tcp://127.0.0.1:{free_tcp_port()}"
    up = subprocess.Popen([*CLI, "up", str(path), "--rest-port", "0", "--no-writer", "--status-interval",
                           "0.2", "--stream-send", send, "--live-stream", live, "--live-stream-mode", "batch",
                           "--live-stream-param", "1,10", "--log-level", "WARNING"],
                          env=dict(os.environ, STD_DAQ_IPC_DIR=ipc_env))
    try:
        status_path = ipc.status_file(config.detector_name)

        def streams_up() -> list[int] | None:
            if not os.path.exists(status_path):
                return None
            services = read_status(status_path)["services"]
            names = [s["name"] for s in services]
            ok = names == ["receiver-0", "assembler", "stream-send", "live-stream"]
            ready = ok and all(s["alive"] and s["counters"] for s in services)
            return [s["pid"] for s in services] if ready else None

        pids = wait_for(streams_up, "receiver, assembler, stream-send and live-stream reporting", 120)
        assert os.path.exists(live.removeprefix("ipc://"))
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    assert not any(pid_alive(p) for p in pids)
    assert_no_leftovers(config, ipc_env)
