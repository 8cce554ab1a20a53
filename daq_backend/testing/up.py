"""``std-daq up`` of one detector, run as a user runs it (separate processes, RabbitMQ) and driven
over REST and the broker, for system and fault tests.

``running_daq`` / ``scaled_daq`` start ``std-daq up`` of a one-module Jungfrau (``scaled_daq``: with
``n_writers`` h5 writers), wait until every process is alive and the REST API healthy, and at the end
stop it with Ctrl-C and check that no process, ring or ipc file is left. ``Daq`` reads its processes'
status and its REST answers; ``Detector`` / ``SequenceDetector`` stream the built-in simulator's images
at a rate; ``Broker`` follows the broker status of the detector's requests. ``final_everywhere``
checks that REST, broker and ``/writer/status`` are all final within a bound; ``file_state``,
``assert_balanced``, ``assert_agree``, ``assert_rows`` and ``assert_pixels`` check a file against REST
and the simulator's pattern.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import requests

from daq_backend import ipc
from daq_backend.broker import StatusAggregator, make_transport
from daq_backend.broker.protocol import Action
from daq_backend.config import DetectorConfig
from daq_backend.messages import FAULT_BOUND, ImageAccounting
from daq_backend.simulator.pattern import expected_image
from daq_backend.simulator.sender import DetectorSimulator
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
from daq_backend.topology import h5_writer_name
from daq_backend.writer import layout, master

CLI = (sys.executable, "-m", "daq_backend.cli")


SERVICES = {"receiver-0", "assembler", "h5-writer", "writer-agent", "rest"}


FINAL = ("completed", "interrupted", "failed")


@dataclass
class Daq:
    """A running ``std-daq up``: its detector config, REST URL and output root."""
    config: DetectorConfig
    url: str
    output: Path

    def services(self) -> dict[str, dict[str, Any]]:
        """Every process's status entry, by name, from the supervisor's status file."""
        status = read_status(ipc.status_file(self.config.detector_name))
        return {s["name"]: s for s in status["services"]}

    def rest(self, request_id: str) -> dict[str, Any]:
        """``GET /requests/{request_id}``."""
        return requests.get(f"{self.url}/requests/{request_id}", timeout=30).json()

    def writer_state(self) -> str:
        """The writer's state from ``GET /writer/status``."""
        return requests.get(f"{self.url}/writer/status", timeout=30).json()["writer"]["state"]


def start_daq(ipc_dir: str, folder: Path, output: Path,
              n_writers: int = 1) -> tuple[subprocess.Popen[bytes], Daq]:
    """Start ``std-daq up`` of a one-module Jungfrau (with ``n_writers`` h5 writers) on RabbitMQ in
    the background; returns the process and its ``Daq``."""
    fields: dict[str, Any] = {"n_writers": n_writers} if n_writers != 1 else {}
    config = make_config("jungfrau", frame_ring_slots=64, image_ring_slots=256, module_sync_timeout=2.0,
                         **fields)
    path = folder / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    port = free_tcp_port()
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_dir)
    proc = subprocess.Popen([*CLI, "up", str(path), "--rest-port", str(port), "--status-interval", "0.2",
                             "--broker-url", RABBITMQ_URL, "--output-root", str(output),
                             "--log-level", "WARNING"], env=env)
    daq = Daq(config, f"http://127.0.0.1:{port}", output)
    return proc, daq


@contextlib.contextmanager
def running_daq(ipc_dir: str, folder: Path, output: Path, n_writers: int = 1) -> Iterator[Daq]:
    """``std-daq up`` of a 1-module Jungfrau (with ``n_writers`` h5 writers) on RabbitMQ, every
    service alive, REST healthy."""
    proc, daq = start_daq(ipc_dir, folder, output, n_writers)
    expected = SERVICES if n_writers == 1 else {*SERVICES - {"h5-writer"}, *writer_names(n_writers)}
    pids: list[int] = []
    try:
        def up() -> list[int] | None:
            if not os.path.exists(ipc.status_file(daq.config.detector_name)):
                return None
            services = daq.services()
            if set(services) == expected and all(s["alive"] for s in services.values()):
                return [s["pid"] for s in services.values()]
            return None

        pids = wait_for(up, "every service of std-daq up alive", 180)
        wait_for(lambda: healthy(daq.url), "REST API healthy", 120)
        yield daq
        pids = [s["pid"] for s in daq.services().values()]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    assert pids and not any(pid_alive(p) for p in pids)
    assert_no_leftovers(daq.config, ipc_dir)


class Detector:
    """The simulator sending image ids 1, 2, ... at ``rate`` until stopped."""

    def __init__(self, config: DetectorConfig, rate: float = 100.0) -> None:
        self.sim = DetectorSimulator(config)
        self.period = 1.0 / rate
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.sent += 1
            self.sim.send_image(self.sent)
            self._stop.wait(max(0.0, t0 + self.sent * self.period - time.monotonic()))

    def __enter__(self) -> Detector:
        self._thread.start()
        wait_for(lambda: self.sent >= 5, "the detector streaming", 60)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sim.close()


class Broker:
    """The broker's view: every status of the detector's requests (``StatusAggregator``)."""

    def __init__(self, tag: str) -> None:
        self.transport = make_transport(RABBITMQ_URL)
        self.aggregator = StatusAggregator(self.transport, tag)
        #: request ids in the order their first status came
        self.seen: list[str] = []
        self.aggregator.add_listener(
            lambda status: None if status.request_id in self.seen else self.seen.append(status.request_id))

    def __enter__(self) -> Broker:
        self.aggregator.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.aggregator.stop()
        self.transport.close()

    def final(self, request_id: str, timeout: float) -> tuple[Action, Any]:
        """The (action, message) of the request's final broker status."""
        done = self.aggregator.wait_for_complete(request_id, timeout=timeout)
        (action, message), = [reports[-1] for reports in done["services"].values()]
        return action, message


def rows(path: Path) -> int:
    """The rows written to ``path`` so far (0 while it cannot be read)."""
    try:
        with h5py.File(path, "r", swmr=True) as h5:
            return layout.written_rows(h5)
    except (OSError, KeyError):
        return 0


def submit(daq: Daq, name: str, n_images: int, **extra: Any) -> tuple[str, Path]:
    """``POST /write_async`` of ``n_images`` to ``name`` in the output root; returns the request id and
    the file."""
    output = daq.output / name
    body = {"output_file": str(output), "n_images": n_images, "timeout": 60, **extra}
    answer = requests.post(f"{daq.url}/write_async", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["request_id"], output


def kill_service(daq: Daq, name: str) -> float:
    """SIGKILL the service ``name``; returns the time of the kill (monotonic)."""
    os.kill(daq.services()[name]["pid"], signal.SIGKILL)
    return time.monotonic()


def final_everywhere(daq: Daq, broker: Broker, request_id: str, since: float,
                     bound: float = FAULT_BOUND) -> tuple[dict[str, Any], tuple[Action, Any], float]:
    """REST, broker status and ``/writer/status`` all final within ``bound`` s of ``since``; returns the
    REST status, the broker's last (action, message) and the seconds until REST was final."""
    rest = wait_for(lambda: (s := daq.rest(request_id))["state"] in FINAL and s,
                    f"REST final within {bound:g} s", max(1.0, since + bound - time.monotonic()))
    took = time.monotonic() - since
    assert took <= bound, f"REST final after {took:.1f} s"
    action, message = broker.final(request_id, timeout=max(1.0, since + bound - time.monotonic()))
    wait_for(lambda: daq.writer_state() == "READY", "/writer/status READY",
             max(1.0, since + bound - time.monotonic()))
    assert time.monotonic() - since <= bound
    return rest, (action, message), took


def file_state(path: Path) -> tuple[dict[str, Any], dict[str, int], np.ndarray]:
    """A plain reader opens the file (it was closed or recovered): attributes, counts, ids."""
    with h5py.File(path, "r") as h5:
        attrs = dict(h5.attrs)
        counts = layout.file_accounting(h5)
        n = counts["n_written"]
        assert h5[layout.DATA].shape[0] == n and int(attrs["n_written"]) == n
        ids = h5[layout.IMAGE_ID][:n].astype(np.int64)
    return attrs, counts, ids


def assert_pixels(config: DetectorConfig, path: Path, rows_to_check: list[int]) -> None:
    """The rows ``rows_to_check`` of the file are the simulator's images of their ids."""
    with h5py.File(path, "r") as h5:
        for row in rows_to_check:
            image_id = int(h5[layout.IMAGE_ID][row])
            np.testing.assert_array_equal(h5[layout.DATA][row], expected_image(config, image_id))


def assert_balanced(rest: dict[str, Any], counts: dict[str, int], n_requested: int) -> None:
    """File and REST agree on the rows, and every requested image is accounted for."""
    assert rest["n_written"] == counts["n_written"]
    assert rest["n_missing_images"] == counts["n_lost"]
    assert rest["n_incomplete_images"] == counts["n_incomplete"]
    accounting = ImageAccounting(n_requested=n_requested, n_written=counts["n_written"],
                                 n_good=counts["n_good"], n_incomplete=counts["n_incomplete"],
                                 n_lost=counts["n_lost"], n_not_written=n_requested - counts["n_written"])
    assert accounting.balanced()


def next_write_works(daq: Daq, name: str = "after.h5", n_images: int = 20) -> None:
    """A ``write_sync`` after the fault: answered, completed, the file complete."""
    output = daq.output / name
    answer = requests.post(f"{daq.url}/write_sync", json={"output_file": str(output), "n_images": n_images,
                                                          "timeout": 60}, timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"]["state"] == "completed", answer.text
    attrs, counts, ids = file_state(output)
    assert attrs["status"] == "completed" and counts["n_good"] == n_images and np.all(np.diff(ids) == 1)


def report(scenario: str, **numbers: Any) -> None:
    """Print a scenario's measured numbers (seen with ``pytest -s``)."""
    print(f"\n[{scenario}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


class SequenceDetector:
    """Sends ``sequence`` (image ids, in order, cycled) at ``rate`` until stopped; ``sent``: what went
    out."""

    def __init__(self, config: DetectorConfig, sequence: list[int], rate: float) -> None:
        self.sim = DetectorSimulator(config)
        self.sequence = sequence
        self.period = 1.0 / rate
        self.sent: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def last(self) -> int:
        """The last image id sent (the first of the sequence before any)."""
        return self.sent[-1] if self.sent else self.sequence[0]

    def _run(self) -> None:
        t0 = time.monotonic()
        i = 0
        while not self._stop.is_set():
            self.sim.send_image(self.sequence[i % len(self.sequence)])
            self.sent.append(self.sequence[i % len(self.sequence)])
            i += 1
            self._stop.wait(max(0.0, t0 + i * self.period - time.monotonic()))

    def __enter__(self) -> SequenceDetector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sim.close()


def writer_names(n_writers: int) -> set[str]:
    """The service names of ``n_writers`` h5 writers."""
    return {h5_writer_name(index) for index in ipc.writer_indices(n_writers)}


@contextlib.contextmanager
def scaled_daq(ipc_dir: str, folder: Path, n_writers: int) -> Iterator[Daq]:
    """``std-daq up`` of a 1-module Jungfrau with ``n_writers`` h5 writers on RabbitMQ (files in
    ``folder/data``), every service alive, REST healthy."""
    output = folder / "data"
    output.mkdir()
    with running_daq(ipc_dir, folder, output, n_writers) as daq:
        yield daq


def part_paths(output: Path, n_writers: int) -> list[Path]:
    """The part files of the master ``output`` written by ``n_writers`` writers."""
    return [output.with_name(master.part_file_name(output, k)) for k in range(n_writers)]


def leading(output: Path) -> int:
    """The master's complete leading rows now (0 until the master and its parts exist)."""
    try:
        return master.leading_rows(master.part_rows(output))
    except (OSError, KeyError):
        return 0


def assert_rows(config: DetectorConfig, h5: h5py.File, n_rows: int) -> np.ndarray:
    """The master's first ``n_rows`` rows: consecutive ids, good, each the simulator's image."""
    ids = h5[layout.IMAGE_ID][:n_rows].astype(np.int64)
    assert len(ids) == n_rows and np.all(np.diff(ids) == 1), ids
    assert not h5[layout.STATUS][:n_rows].any()
    data = h5[layout.DATA]
    for row in range(n_rows):
        np.testing.assert_array_equal(data[row], expected_image(config, int(ids[row])), err_msg=f"row {row}")
    return ids


def assert_agree(rest: dict[str, object], counts: dict[str, int], n_requested: int) -> None:
    """File and REST agree on the rows, and every requested image is accounted for."""
    assert rest["n_written"] == counts["n_written"]
    assert rest["n_missing_images"] == counts["n_lost"]
    assert rest["n_incomplete_images"] == counts["n_incomplete"]
    assert ImageAccounting(n_requested=n_requested, n_written=counts["n_written"], n_good=counts["n_good"],
                           n_incomplete=counts["n_incomplete"], n_lost=counts["n_lost"],
                           n_not_written=n_requested - counts["n_written"]).balanced()
