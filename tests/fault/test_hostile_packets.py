"""Hostile packets during a write, through the processes ``std-daq up`` runs (receivers, assembler, writer
agent + h5 writer, REST) on RabbitMQ, with real UDP on loopback.

A simulated 2-module Jungfrau streams while a spoofer mixes in datagrams that look like its packets:
absurd numbers (frame numbers 2**63.., module ids 2..65535, absurd bunch ids), foreign module ids next
to the real frame numbers, far-away numberings and fake pulse ids. The file must hold exactly the
images the simulator sent (pixel for pixel, ids increasing, every row good), every spoofed datagram
must be counted under its reason by the receiver of its port, and the file, REST and the broker
status must report the same final state within ``FAULT_BOUND``. A second test streams restarted
numberings and gaps (lost frames) into one write: the file holds exactly the frames sent."""

from __future__ import annotations

import json
import os
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
import requests

from daq_backend import ipc
from daq_backend.broker import StatusAggregator, make_transport
from daq_backend.broker.protocol import Action
from daq_backend.config import DetectorConfig
from daq_backend.messages import FAULT_BOUND, ImageAccounting
from daq_backend.simulator.pattern import expected_image
from daq_backend.simulator.spoof import Spoofer, SpoofKind
from daq_backend.supervisor import read_status
from daq_backend.testing import (
    RABBITMQ_URL,
    assert_no_leftovers,
    free_tcp_port,
    healthy,
    make_config,
    pid_alive,
    wait_for,
)
from daq_backend.testing.up import SequenceDetector

CLI = (sys.executable, "-m", "daq_backend.cli")
SERVICES = {"receiver-0", "receiver-1", "assembler", "h5-writer", "writer-agent", "rest"}
FINAL = ("completed", "interrupted", "failed")


@dataclass
class Daq:
    config: DetectorConfig
    url: str
    env: dict[str, str]
    tmp: Path

    def counters(self, service: str) -> dict[str, int]:
        status = read_status(ipc.status_file(self.config.detector_name))
        return next(s for s in status["services"] if s["name"] == service)["counters"]


@pytest.fixture
def daq(ipc_env: str, tmp_path: Path) -> Iterator[Daq]:
    """``std-daq up`` of a 2-module Jungfrau on RabbitMQ (its tag: the detector's unique name)."""
    config = make_config("jungfrau", n_modules=2, frame_ring_slots=64, image_ring_slots=256,
                         module_sync_timeout=2.0)
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    port = free_tcp_port()
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    proc = subprocess.Popen([*CLI, "up", str(path), "--rest-port", str(port), "--status-interval", "0.2",
                             "--broker-url", RABBITMQ_URL], env=env)
    pids: list[int] = []
    try:
        status_path = ipc.status_file(config.detector_name)

        def services_up() -> list[int] | None:
            if not os.path.exists(status_path):
                return None
            services = read_status(status_path)["services"]
            if {s["name"] for s in services} == SERVICES and all(s["alive"] for s in services):
                return [s["pid"] for s in services]
            return None

        pids = wait_for(services_up, "every service of std-daq up alive", 120)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url), "REST API healthy", 120)
        yield Daq(config, url, env, tmp_path)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    assert pids and not any(pid_alive(p) for p in pids)
    assert_no_leftovers(config, ipc_env)


def write(
    daq: Daq, n_images: int, name: str, during: Any = None
) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """A write of the next ``n_images`` over REST, ``during()`` called once it runs; returns the final
    REST status, the broker's final status of the writer and the file. Asserts that every interface
    reached its final state within ``FAULT_BOUND`` of the first one."""
    output = daq.tmp / name
    transport = make_transport(RABBITMQ_URL)
    aggregator = StatusAggregator(transport, daq.config.detector_name)
    try:
        aggregator.start()
        body = {"output_file": str(output), "n_images": n_images, "timeout": 120}
        answer = requests.post(f"{daq.url}/write_async", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["request_id"]

        def rest() -> dict[str, Any]:
            return requests.get(f"{daq.url}/requests/{request_id}", timeout=30).json()

        wait_for(lambda: rest()["state"] != "queued", "the write running", 120)
        if during is not None:
            during()
        done = aggregator.wait_for_complete(request_id, timeout=300)
        broker_final = time.monotonic()
        final = wait_for(lambda: (s := rest())["state"] in FINAL and s, "REST final state", FAULT_BOUND)
        assert time.monotonic() - broker_final <= FAULT_BOUND
        (action, message), = [reports[-1] for reports in done["services"].values()]
        return final, {"action": action, "message": message}, output
    finally:
        aggregator.stop()
        transport.close()


def read_file(path: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, h5py.Dataset]:
    f = h5py.File(path, "r")
    data = f["/entry/data"]
    return dict(f.attrs), data["image_id"][:], data["status"][:], data["data"]


def test_spoofed_and_absurd_packets_during_a_write_never_reach_the_file(daq: Daq) -> None:
    config = daq.config
    n_images = 100
    with SequenceDetector(config, list(range(1, 10**6)), rate=50) as detector:
        wait_for(lambda: len(detector.sent) >= 5, "the detector streaming", 60)
        spoofer = Spoofer(config, 1500, 4000, list(SpoofKind), near=lambda: detector.last)
        final, broker, path = write(daq, n_images, "hostile.h5", during=spoofer.start)
        assert spoofer.wait(120) and spoofer.error is None
        spoofer.close()
    attrs, ids, status, data = read_file(path)
    with data.file:
        assert attrs["status"] == "completed" and attrs["n_written"] == n_images
        assert len(ids) == n_images and np.all(np.diff(ids.astype(np.int64)) == 1)  # the stream, in order
        assert np.all(status == 0)
        for row, image_id in enumerate(ids):
            np.testing.assert_array_equal(data[row], expected_image(config, int(image_id)))
    # every interface says the same
    accounting = ImageAccounting(n_requested=n_images, n_written=final["n_written"],
                                 n_good=int(np.sum(status == 0)), n_incomplete=final["n_incomplete_images"],
                                 n_lost=final["n_missing_images"])
    assert accounting.balanced()
    assert final["state"] == "completed" and final["n_written"] == attrs["n_written"]
    assert broker["action"] is Action.SUCCESS and broker["message"]["n_written"] == n_images
    assert broker["message"]["n_incomplete_images"] == broker["message"]["n_missing_images"] == 0
    # every spoofed datagram was counted under its reason by the receiver of its port
    for module in (0, 1):
        expected = spoofer.expected_rejections(module)
        assert sum(expected.values()) == 2000
        wait_for(lambda m=module, e=expected: {k: daq.counters(f"receiver-{m}").get(k) for k in e} == e,
                 f"receiver-{module} counts {expected}", 60)
        counters = daq.counters(f"receiver-{module}")
        assert counters["bad_datagrams"] == counters["frames_incomplete"] == 0
        assert counters["numbering_restarts"] == 0
    stats = requests.get(f"{daq.url}/stats", timeout=30).json()
    assert stats["rejected"]["out_of_range"] == sum(spoofer.expected_rejections(m)["rejected_out_of_range"]
                                                    for m in (0, 1))
    shown = subprocess.run([*CLI, "status", str(daq.tmp / "detector.json")], capture_output=True, text=True,
                           timeout=60, env=dict(daq.env, COLUMNS="400"))
    assert shown.returncode == 0, shown.stderr
    for counter in ("rejected_module_id=", "rejected_out_of_range=", "rejected_out_of_window="):
        assert counter in shown.stdout


def test_restarted_numberings_and_lost_frames_during_a_write_are_written_as_sent(daq: Daq) -> None:
    """The detector's numbering starts over twice (no pause) and jumps once (frames lost); the file holds
    exactly the frames sent, in the order sent."""
    config = daq.config
    sequence = [*range(1, 41), *range(1, 21), *range(500, 520)]
    n_images = 150
    with SequenceDetector(config, sequence, rate=50) as detector:
        wait_for(lambda: len(detector.sent) >= 5, "the detector streaming", 60)
        final, broker, path = write(daq, n_images, "restarts.h5")
        sent = list(detector.sent)
    attrs, ids, status, data = read_file(path)
    with data.file:
        assert attrs["status"] == "completed" and len(ids) == n_images and np.all(status == 0)
        ids_list = [int(i) for i in ids]
        starts = [k for k in range(len(sent) - n_images + 1) if sent[k : k + n_images] == ids_list]
        assert starts, f"the file's ids {ids_list[:5]}... are no stretch of the frames sent"
        for row in range(0, n_images, 7):
            np.testing.assert_array_equal(data[row], expected_image(config, ids_list[row]))
    assert final["state"] == "completed" and final["n_written"] == n_images
    assert broker["action"] is Action.SUCCESS and broker["message"]["n_written"] == n_images
    accounting = ImageAccounting(n_requested=n_images, n_written=final["n_written"],
                                 n_good=int(np.sum(status == 0)), n_incomplete=final["n_incomplete_images"],
                                 n_lost=final["n_missing_images"])
    assert accounting.balanced()
    restarts = ids_list.count(1)
    assert restarts >= 1  # the write spanned at least one restart of the numbering
    for module in (0, 1):
        # counters are reported once a second: the last restarts reach the status within the bound
        wait_for(lambda m=module: daq.counters(f"receiver-{m}")["numbering_restarts"] >= restarts,
                 f"receiver-{module} to report {restarts} numbering restarts", FAULT_BOUND)
        counters = daq.counters(f"receiver-{module}")
        assert counters["frames_skipped"] > 0 and counters["rejected_out_of_window"] == 0
