"""The broker goes away, idle and during a write, with every process of ``std-daq up`` on RabbitMQ.

The DAQ reaches RabbitMQ through a :class:`~tests.fault.broker_proxy.BrokerProxy` that the test cuts
and restores (the machine's broker keeps running for everybody else); the test's own status listener
and the client that stands for ``std-daq write`` on another host talk to RabbitMQ directly.

* idle: ``/health`` answers 503 with ``"broker": "down"`` and ``std-daq status`` says so (exit 3); a
  write is answered 503 within ``BROKER_ANSWER_BOUND`` and never runs; a request that reaches the
  writer agent only after its deadline (it waited in the broker while the agent was cut off) is refused
  as expired, no file appears, and REST, the broker status and the (absent) file agree; after the
  restore the API is healthy again and the next write completes;
* mid-write: the write goes on while the broker is away (the file completes before the restore), and
  after the restore the broker status and REST report it completed, with the file's counts, within
  ``FAULT_BOUND``;
* a network partition (connections stay open, nothing passes): a write is still answered 503 within
  ``BROKER_ANSWER_BOUND``, and the heartbeat makes every process notice the loss
  (``/health`` 503) within ``2 * (DEFAULT_HEARTBEAT_S + 5)`` s;
* ``std-daq write`` on the broker answers in one line within the bound when nobody serves the
  detector or the broker is gone.
"""

from __future__ import annotations

import io
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
from daq_backend.broker import BrokerClient, StatusAggregator, make_transport
from daq_backend.broker.protocol import Action
from daq_backend.broker.rabbitmq import DEFAULT_HEARTBEAT_S
from daq_backend.config import DetectorConfig
from daq_backend.messages import FAULT_BOUND, ImageAccounting
from daq_backend.rest.backend import BROKER_ANSWER_BOUND
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
from daq_backend.testing.broker_proxy import BrokerProxy
from daq_backend.testing.up import SequenceDetector
from daq_backend.writer.client import write_main

CLI = (sys.executable, "-m", "daq_backend.cli")
SERVICES = {"receiver-0", "assembler", "h5-writer", "writer-agent", "rest"}
FINAL = ("completed", "interrupted", "failed")
WAIT_S = 120.0


@dataclass
class Daq:
    config: DetectorConfig
    config_path: Path
    url: str
    env: dict[str, str]
    tmp: Path
    proxy: BrokerProxy

    def health(self) -> requests.Response:
        return requests.get(f"{self.url}/health", timeout=30)

    def request(self, request_id: str) -> dict[str, Any]:
        return requests.get(f"{self.url}/requests/{request_id}", timeout=30).json()


@pytest.fixture
def daq(ipc_env: str, tmp_path: Path, broker_proxy: BrokerProxy) -> Iterator[Daq]:
    """``std-daq up`` of a 1-module Jungfrau whose every process reaches RabbitMQ through the proxy."""
    config = make_config("jungfrau", image_ring_slots=256)
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    port = free_tcp_port()
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    proc = subprocess.Popen([*CLI, "up", str(path), "--rest-port", str(port), "--status-interval", "0.2",
                             "--broker-url", broker_proxy.url, "--output-root", str(tmp_path)], env=env)
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

        pids = wait_for(services_up, "every service of std-daq up alive", WAIT_S)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url), "REST API healthy", WAIT_S)
        yield Daq(config, path, url, env, tmp_path, broker_proxy)
    finally:
        broker_proxy.restore()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    assert pids and not any(pid_alive(p) for p in pids)
    assert_no_leftovers(config, ipc_env)


@pytest.fixture
def listener(daq: Daq) -> Iterator[tuple[StatusAggregator, BrokerClient]]:
    """A status listener and a request client of the detector's tag on RabbitMQ itself (not cut)."""
    transport = make_transport(RABBITMQ_URL)
    aggregator = StatusAggregator(transport, daq.config.detector_name)
    aggregator.start()
    try:
        yield aggregator, BrokerClient(transport, daq.config.detector_name)
    finally:
        aggregator.stop()
        transport.close()


def file_state(path: Path) -> dict[str, Any] | None:
    """The attributes of a closed HDF5 file (None while it is missing or still open for writing)."""
    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs)
    except (OSError, FileNotFoundError):
        return None


def status_command(daq: Daq) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "status", str(daq.config_path)], env=daq.env, capture_output=True,
                          text=True, timeout=WAIT_S)


def test_broker_stopped_while_idle(daq: Daq, listener: tuple[StatusAggregator, BrokerClient]) -> None:
    aggregator, client = listener
    answer = daq.health()
    assert answer.status_code == 200 and answer.json()["broker"] == "up", answer.text
    assert status_command(daq).returncode == 0

    daq.proxy.cut()
    cut = time.monotonic()
    body = wait_for(lambda: (r := daq.health()).status_code == 503 and r.json(), "/health: 503", FAULT_BOUND)
    seen_down = time.monotonic() - cut
    assert body["status"] == "unavailable" and body["broker"] == "down" and body["broker_kind"] == "amqp"
    assert body["broker_where"].startswith(f"127.0.0.1:{daq.proxy.port}") and body["broker_error"]
    problems = requests.get(f"{daq.url}/ui/snapshot", timeout=30).json()["problems"]
    assert any(p["severity"] == "error" and p["text"].startswith(f"broker 127.0.0.1:{daq.proxy.port}")
               and "write requests are refused (503)" in p["text"] for p in problems), problems
    status = status_command(daq)
    assert status.returncode == 3, status.stdout + status.stderr
    assert f"broker 127.0.0.1:{daq.proxy.port}" in status.stdout and "DOWN" in status.stdout

    # a write through REST is refused at once, and can never run later
    output = daq.tmp / "during-outage.h5"
    sent = time.monotonic()
    answer = requests.post(f"{daq.url}/write_async", json={"n_images": 5, "output_file": str(output)},
                           timeout=WAIT_S)
    answered_in = time.monotonic() - sent
    assert answer.status_code == 503, answer.text
    assert answered_in <= BROKER_ANSWER_BOUND + FAULT_BOUND  # bounded (the bound plus slack for load)
    assert "broker unreachable" in answer.json()["detail"] and "will never run" in answer.json()["detail"]
    refused_id = answer.json()["request_id"]
    refused = daq.request(refused_id)
    assert refused["state"] == "failed" and refused["message"].startswith("not sent: broker unreachable")

    # a request the broker holds for the cut-off writer agent until after its deadline
    # (e.g. `std-daq write` on another host, which gave up after its bound)
    late_output = daq.tmp / "late.h5"
    deadline = time.time() + 1.0
    late_id = client.request({"n_images": 5, "output_file": str(late_output)}, deadline=deadline)
    wait_for(lambda: time.time() > deadline + 1.0, "the request's deadline to pass", WAIT_S)

    daq.proxy.restore()
    restored = time.monotonic()
    done = aggregator.wait_for_complete(late_id, timeout=FAULT_BOUND)
    (action, message), = [reports[-1] for reports in done["services"].values()]
    expired_after = time.monotonic() - restored
    assert action is Action.FAIL and message.startswith(f"expired: request {late_id} reached"), message
    assert [a for a, _ in done["services"]["writer_agent"]] == [Action.FAIL]  # never started
    wait_for(lambda: daq.health().status_code == 200, "/health: 200 after the restore", FAULT_BOUND)
    healthy_after = time.monotonic() - restored
    late = wait_for(lambda: (s := daq.request(late_id))["state"] in FINAL and s, "REST: the expired request",
                    FAULT_BOUND)
    assert late["state"] == "failed" and late["message"] == message
    for record in (late, daq.request(refused_id)):  # neither wrote a row: all 5 images not written
        accounting = ImageAccounting(n_requested=5, n_written=record["n_written"], n_not_written=5)
        assert accounting.balanced() and record["n_written"] == 0, record
    with pytest.raises(KeyError):
        aggregator.status(refused_id)  # it never reached the broker
    assert daq.request(refused_id)["state"] == "failed"
    assert not output.exists() and not late_output.exists()
    assert status_command(daq).returncode == 0

    # and the DAQ writes again
    with SequenceDetector(daq.config, list(range(1, 10**6)), rate=50) as detector:
        wait_for(lambda: len(detector.sent) >= 3, "the detector streaming", WAIT_S)
        ok = daq.tmp / "after.h5"
        answer = requests.post(f"{daq.url}/write_async", json={"n_images": 5, "output_file": str(ok)},
                               timeout=WAIT_S)
        assert answer.status_code == 200, answer.text
        after = aggregator.wait_for_complete(answer.json()["request_id"], timeout=WAIT_S)
    assert after["status"] is Action.SUCCESS, after
    assert file_state(ok)["n_written"] == 5  # type: ignore[index]
    assert not output.exists() and not late_output.exists()  # still never written
    print(f"\nbroker cut while idle: /health 503 after {seen_down:.2f} s, write_async 503 in "
          f"{answered_in:.2f} s; restored: late request refused as expired after {expired_after:.2f} s, "
          f"/health 200 after {healthy_after:.2f} s")


def test_broker_stopped_mid_write(daq: Daq, listener: tuple[StatusAggregator, BrokerClient]) -> None:
    aggregator, _ = listener
    n_images = 150
    output = daq.tmp / "through-outage.h5"
    with SequenceDetector(daq.config, list(range(1, 10**6)), rate=50) as detector:
        wait_for(lambda: len(detector.sent) >= 3, "the detector streaming", WAIT_S)
        answer = requests.post(f"{daq.url}/write_async",
                               json={"n_images": n_images, "output_file": str(output), "timeout": 60},
                               timeout=WAIT_S)
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["request_id"]
        wait_for(lambda: daq.request(request_id)["n_written"] >= 10, "the write under way", WAIT_S)
        daq.proxy.cut()
        wait_for(lambda: daq.health().status_code == 503, "/health: 503", FAULT_BOUND)
        at_cut = daq.request(request_id)
        assert at_cut["state"] == "running" and at_cut["n_written"] < n_images
        # the write goes on without the broker: the file is completed and closed while it is away
        attrs = wait_for(lambda: file_state(output), "the file completed during the outage", WAIT_S)
        assert daq.proxy.is_cut
    assert attrs["status"] == "completed" and attrs["n_written"] == n_images

    daq.proxy.restore()
    restored = time.monotonic()
    done = aggregator.wait_for_complete(request_id, timeout=FAULT_BOUND)
    broker_after = time.monotonic() - restored
    (action, message), = [reports[-1] for reports in done["services"].values()]
    assert action is Action.SUCCESS, message
    final = wait_for(lambda: (s := daq.request(request_id))["state"] in FINAL and s, "REST final state",
                     FAULT_BOUND)
    rest_after = time.monotonic() - restored
    assert rest_after <= FAULT_BOUND
    with h5py.File(output, "r") as f:
        status = f["/entry/data/status"][:]
    accounting = ImageAccounting(n_requested=n_images, n_written=final["n_written"],
                                 n_good=int(np.sum(status == 0)), n_incomplete=final["n_incomplete_images"],
                                 n_lost=final["n_missing_images"])
    assert accounting.balanced(), accounting
    assert final["state"] == "completed" and final["n_written"] == attrs["n_written"] == n_images
    assert message["n_written"] == n_images and message["output_file"] == str(output)
    print(f"\nbroker cut mid-write at {at_cut['n_written']}/{n_images}: file completed during the outage; "
          f"restored: broker status final after {broker_after:.2f} s, REST after {rest_after:.2f} s")


def test_network_partition_while_idle(daq: Daq, listener: tuple[StatusAggregator, BrokerClient]) -> None:
    aggregator, _ = listener
    daq.proxy.freeze()
    frozen = time.monotonic()
    output = daq.tmp / "partition.h5"
    answer = requests.post(f"{daq.url}/write_async", json={"n_images": 5, "output_file": str(output)},
                           timeout=WAIT_S)
    answered_in = time.monotonic() - frozen
    assert answer.status_code == 503, answer.text  # the broker never confirmed it: not sent
    assert answered_in <= BROKER_ANSWER_BOUND + FAULT_BOUND
    request_id = answer.json()["request_id"]
    assert daq.request(request_id)["state"] == "failed"
    heartbeat_bound = 2 * (DEFAULT_HEARTBEAT_S + 5)
    wait_for(lambda: daq.health().status_code == 503, "/health: 503", heartbeat_bound + FAULT_BOUND)
    noticed = time.monotonic() - frozen
    assert "DOWN" in status_command(daq).stdout

    daq.proxy.restore()
    restored = time.monotonic()
    wait_for(lambda: daq.health().status_code == 200, "/health: 200 after the partition", FAULT_BOUND)
    healthy_after = time.monotonic() - restored
    with pytest.raises(KeyError):
        aggregator.status(request_id)  # it never reached the broker
    record = daq.request(request_id)
    assert record["state"] == "failed" and not output.exists()
    assert ImageAccounting(n_requested=5, n_written=record["n_written"], n_not_written=5).balanced()
    print(f"\nnetwork partition: write_async 503 after {answered_in:.2f} s, /health 503 after "
          f"{noticed:.2f} s; healed: /health 200 after {healthy_after:.2f} s")


def test_std_daq_write_during_an_outage_answers_within_the_bound(broker_proxy: BrokerProxy,
                                                                 tmp_path: Path) -> None:
    """``std-daq write`` on the broker: refused in one line, never left waiting, when the broker is
    gone or nobody serves the detector."""
    argv = ["--n-images", "3", "--output", str(tmp_path / "cli.h5"), "--no-progress",
            "--broker-url", broker_proxy.url, "--detector", f"nobody-{os.getpid()}"]
    err = io.StringIO()
    started = time.monotonic()
    assert write_main(argv, out=io.StringIO(), err=err) == 2  # served by nobody: no route
    assert "no writer agent serves detector" in err.getvalue()
    assert time.monotonic() - started <= BROKER_ANSWER_BOUND + FAULT_BOUND
    broker_proxy.cut()
    err = io.StringIO()
    assert write_main(argv, out=io.StringIO(), err=err) == 2
    assert "Cannot connect to RabbitMQ at 127.0.0.1:" in err.getvalue()
    assert not (tmp_path / "cli.h5").exists()
