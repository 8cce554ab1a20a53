"""``std-daq up`` of a small detector as a user runs it, on RabbitMQ, for the fault tests of requests.

:func:`running_up` starts it with the given options and environment, waits until every process
reports and the REST API answers, and stops it (Ctrl-C) at the end, checking nothing is left behind.
:class:`Up` talks to it: REST, the broker directly (a client that bypasses the REST API), the
supervisor's status and a simulated detector that streams while a test needs images."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from daq_backend import ipc
from daq_backend.broker import (
    REQUEST_EXCHANGE,
    Action,
    BrokerClient,
    Message,
    StatusAggregator,
    make_transport,
)
from daq_backend.config import DetectorConfig
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

CLI = (sys.executable, "-m", "daq_backend.cli")
SERVICES = {"receiver-0", "assembler", "h5-writer", "writer-agent", "rest"}
FINAL = ("completed", "interrupted", "failed")
WAIT_S = 120.0


@dataclass
class Up:
    config: DetectorConfig
    url: str
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)

    def post(self, path: str, body: Any = None, *, data: bytes | None = None) -> requests.Response:
        if data is None:
            data = json.dumps(body).encode()
        return requests.post(f"{self.url}{path}", data=data, headers={"Content-type": "application/json"},
                             timeout=WAIT_S)

    def request_status(self, request_id: str) -> dict[str, Any]:
        return requests.get(f"{self.url}/requests/{request_id}", timeout=WAIT_S).json()

    def rest_final(self, request_id: str, timeout: float = WAIT_S) -> dict[str, Any]:
        return wait_for(lambda: (s := self.request_status(request_id))["state"] in FINAL and s,
                        f"request {request_id} final in REST", timeout)

    def services(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in read_status(ipc.status_file(self.config.detector_name))["services"]}

    @contextlib.contextmanager
    def broker(self) -> Iterator[tuple[BrokerClient, StatusAggregator]]:
        """A client of the writer agent's tag straight on RabbitMQ, and the status it publishes."""
        transport = make_transport(RABBITMQ_URL)
        aggregator = StatusAggregator(transport, self.config.detector_name)
        aggregator.start()
        try:
            yield BrokerClient(transport, self.config.detector_name), aggregator
        finally:
            aggregator.stop()
            transport.close()

    def broker_final(self, client: BrokerClient, aggregator: StatusAggregator,
                     body: dict[str, Any] | bytes) -> tuple[Action, Any]:
        """Send one request on the broker (bytes: as they are) and return the agent's final action and
        message."""
        request_id = str(uuid.uuid4())
        if isinstance(body, bytes):
            client.transport.publish(Message(REQUEST_EXCHANGE, client.tag, body, request_id), mandatory=True)
        else:
            client.request(body, request_id=request_id)
        done = aggregator.wait_for_complete(request_id, timeout=WAIT_S)
        (action, message), = [reports[-1] for reports in done["services"].values()]
        return action, message


@contextlib.contextmanager
def running_up(tmp_path: Path, *options: str, env: Mapping[str, str] | None = None,
               unset: Sequence[str] = ()) -> Iterator[Up]:
    """``std-daq up`` of a 1-module Jungfrau on RabbitMQ with ``options``, its own ipc folder and
    ``env`` (``unset``: variables removed from it)."""
    config = make_config("jungfrau", frame_ring_slots=32, image_ring_slots=64)
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    ipc_dir = tempfile.mkdtemp(prefix="sdq", dir="/tmp")
    full_env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_dir, **(env or {}))
    for name in unset:
        full_env.pop(name, None)
    port = free_tcp_port()
    proc = subprocess.Popen([*CLI, "up", str(path), "--rest-port", str(port), "--status-interval", "0.2",
                             "--broker-url", RABBITMQ_URL, *options], env=full_env)
    up: Up | None = None
    try:
        status_path = os.path.join(ipc_dir, os.path.basename(ipc.status_file(config.detector_name)))

        def services_up() -> list[int] | None:
            if not os.path.exists(status_path):
                return None
            services = read_status(status_path)["services"]
            if {s["name"] for s in services} == SERVICES and all(s["alive"] and s["counters"] is not None
                                                                 for s in services):
                return [s["pid"] for s in services]
            return None

        pids = wait_for(services_up, "every service of std-daq up alive", WAIT_S)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url), "REST API healthy", WAIT_S)
        up = Up(config, url, full_env, pids)
        previous = os.environ.get("STD_DAQ_IPC_DIR")
        os.environ["STD_DAQ_IPC_DIR"] = ipc_dir  # read_status / ipc names of this test process
        try:
            yield up
        finally:
            if previous is None:
                os.environ.pop("STD_DAQ_IPC_DIR", None)
            else:
                os.environ["STD_DAQ_IPC_DIR"] = previous
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    try:
        assert code == 0
        assert up is not None and not any(pid_alive(p) for p in up.pids)
        assert_no_leftovers(config, ipc_dir)
    finally:
        with contextlib.suppress(OSError):
            for leftover in Path(ipc_dir).iterdir():
                leftover.unlink()
            os.rmdir(ipc_dir)
