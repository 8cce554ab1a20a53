"""This project's full pipeline, run the way production runs it, for one benchmark acquisition.

One OS process per service of the detector's :class:`~daq_backend.topology.Topology` under the
project's :class:`~daq_backend.supervisor.Supervisor`: a receiver per module, the synchroniser/assembler,
the h5 writer and the writer agent (what ``std-daq up`` runs, without the REST API), talking through
the detector's shared-memory rings and ipc sockets; write requests go through an embedded broker hub
in this process. Every child's output goes to a log file so a failure can be shown. Each acquisition
gets a fresh pipeline (fresh processes, so RSS start/end belong to it).

What a run yields is counted from the HDF5 file itself (rows, ``status``, ``image_id``), not from the
pipeline's own claims; the h5 writer's status stream only times the end of writing.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zmq
from _net import bound_udp_ports

from daq_backend import ipc
from daq_backend.broker import BrokerClient, EmbeddedTransport, NoRouteError
from daq_backend.config import DetectorConfig
from daq_backend.supervisor import Supervisor
from daq_backend.topology import Topology
from daq_backend.writer import layout

CHILD_LOG_LEVEL = "WARNING"


class PipelineError(RuntimeError):
    """The pipeline did not come up or died; the message carries the tail of its log."""


@dataclass(frozen=True)
class H5Count:
    """What an HDF5 file holds for an acquisition of ``expected`` image ids."""

    rows: int
    good: int
    incomplete: int
    missing_ids: int
    duplicate_ids: int
    #: rows by ``status`` value that is not 0 (formats.ImageStatus: 1 missing packets, 3 lost in the ring)
    bad_status: dict[int, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_arrays(cls, image_ids: np.ndarray, status: np.ndarray, expected: range) -> H5Count:
        """``good`` = rows with status 0 of distinct expected ids (a frame counts once)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        st = np.asarray(status)
        wanted = np.isin(ids, np.asarray(expected, dtype=np.int64))
        unique_good = np.unique(ids[wanted & (st == 0)])
        present = np.unique(ids[wanted])
        values, counts = np.unique(st[st != 0], return_counts=True)
        return cls(rows=int(ids.size), good=int(unique_good.size), incomplete=int((wanted & (st != 0)).sum()),
                   missing_ids=len(expected) - int(present.size),
                   duplicate_ids=int(ids.size - np.unique(ids).size),
                   bad_status={int(v): int(c) for v, c in zip(values, counts, strict=True)})


def read_h5_counts(path: Path, expected: range) -> H5Count:
    """Count the file's rows (up to ``n_written``: rows past it were never completed)."""
    with h5py.File(path, "r", swmr=True) as h5:
        n = layout.written_rows(h5)
        return H5Count.from_arrays(h5[layout.IMAGE_ID][:n], h5[layout.STATUS][:n], expected)


def _log_to(log_path: Path) -> tuple[str, ...]:
    """A launcher appending a process's output to ``log_path`` (``exec``: the supervisor knows the PID)."""
    return ("/bin/sh", "-c", f'exec "$@" >>{shlex.quote(str(log_path))} 2>&1', "sh")


def pipeline_topology(config: DetectorConfig, config_path: Path, broker_url: str, log_path: Path,
                      rcvbuf: int | None, output_root: Path) -> Topology:
    """What ``std-daq up`` runs without its REST API: receivers, assembler, h5 writer, writer agent,
    writing into ``output_root``."""
    receiver_args = ("--rcvbuf", str(rcvbuf)) if rcvbuf else ()
    return Topology(config, config_path, broker_url, receiver_args=receiver_args, log_level=CHILD_LOG_LEVEL,
                    launcher=_log_to(log_path), output_roots=(str(output_root),))


class WriterEvents:
    """The h5 writer's status stream (JSON events), each stamped with this process' monotonic clock."""

    def __init__(self, address: str) -> None:
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="writer-events", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            raw = self._sock.recv()
            now = time.monotonic()
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                self.events.append((now, event))
                self._cond.notify_all()

    def wait(self, predicate: Callable[[dict[str, Any]], bool],
             timeout: float) -> tuple[float, dict[str, Any]]:
        """The first event (time, event) matching ``predicate``, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for stamp, event in self.events[seen:]:
                    if predicate(event):
                        return stamp, event
                seen = len(self.events)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no matching h5 writer event")
                self._cond.wait(remaining)

    def written(self, request_id: str) -> tuple[int, float | None, dict[str, Any] | None]:
        """(rows flushed, when that count was first reported, the ``finished`` event if any)."""
        n, first_seen, finished = 0, None, None
        with self._cond:
            for stamp, event in self.events:
                if event.get("request_id") != request_id:
                    continue
                count = int(event.get("n_written", 0))
                if count > n or first_seen is None:
                    n, first_seen = count, stamp
                if event.get("event") == "finished":
                    finished = event
        return n, first_seen, finished

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@dataclass
class WriteOutcome:
    n_written: int
    t_end: float  # when the last row was reported written (the request's end when it completed)
    completed: bool
    finished: dict[str, Any] | None


class OurPipeline:
    """One detector's pipeline under a supervisor thread of this process (see module doc)."""

    def __init__(self, config: DetectorConfig, workdir: Path, broker_url: str, *, rcvbuf: int | None = None,
                 startup_timeout: float = 120.0, output_root: Path | None = None) -> None:
        self.config = config
        self.workdir = workdir
        #: the folder the writer may write in (default: the parent of ``workdir``, where the files go)
        self.output_root = output_root or workdir.parent
        self.broker_url = broker_url
        self.rcvbuf = rcvbuf
        self.startup_timeout = startup_timeout
        self.config_path = workdir / f"{config.detector_name}.json"
        self.log_path = workdir / f"{config.detector_name}.log"
        self.supervisor: Supervisor | None = None
        self._thread: threading.Thread | None = None
        self.events: WriterEvents | None = None
        self.transport: EmbeddedTransport | None = None
        self.client: BrokerClient | None = None

    # -- lifetime -----------------------------------------------------------------------------------
    def start(self) -> OurPipeline:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config.to_json_dict(), indent=1))
        topology = pipeline_topology(self.config, self.config_path, self.broker_url, self.log_path,
                                     self.rcvbuf, self.output_root)
        self.supervisor = Supervisor(self.config, self.config_path, topology=topology, stable_after=1e9)
        self.events = WriterEvents(ipc.writer_status_address(self.config.detector_name))
        self._thread = threading.Thread(target=self.supervisor.run, name="supervisor", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        ports = {self.config.udp_port(m) for m in self.config.required_modules}
        while not ports <= bound_udp_ports():
            self._check_alive(deadline, "receivers to bind their UDP ports")
        # receivers and assembler report counters once constructed, i.e. once their rings are created
        # and every page is mapped (seconds for a 4-module detector): not part of any measurement
        readout = {f"receiver-{m}" for m in self.config.required_modules} | {"assembler"}
        while not readout <= {s["name"] for s in self.supervisor.status()["services"] if s.get("counters")}:
            self._check_alive(deadline, "receivers and assembler to create their rings")
        try:
            self.events.wait(lambda e: e.get("event") == "alive", max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            raise PipelineError(f"the h5 writer sent no heartbeat within {self.startup_timeout:g} s\n"
                                f"{self.log_tail()}") from None
        name = self.broker_url.removeprefix("embedded://")
        self.transport = EmbeddedTransport(name)
        self.client = BrokerClient(self.transport, self.config.detector_name)
        return self

    def _check_alive(self, deadline: float, what: str) -> None:
        assert self.supervisor is not None
        dead = [s["name"] for s in self.supervisor.status()["services"] if s["exit_code"] is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"timed out after {self.startup_timeout:g} s"
            raise PipelineError(f"pipeline of {self.config.detector_name}: waiting for {what}: {why}\n"
                                f"{self.log_tail()}")
        time.sleep(0.05)

    def pids(self) -> dict[str, int]:
        assert self.supervisor is not None
        return {name: pid for name, pid in self.supervisor.pids().items() if pid is not None}

    def restarts(self) -> dict[str, int]:
        """Services the supervisor had to restart (their replacement's CPU is not measured)."""
        assert self.supervisor is not None
        return {s["name"]: int(s["restarts"]) for s in self.supervisor.status()["services"] if s["restarts"]}

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self.supervisor is not None:
            self.supervisor.stop()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        if self.events is not None:
            self.events.close()
            self.events = None

    def __enter__(self) -> OurPipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one acquisition ------------------------------------------------------------------------------
    def begin_write(self, n_images: int, output: Path, timeout: float = 60.0) -> str:
        """Request the next ``n_images`` images into ``output``; returns once the file is open."""
        assert self.client is not None and self.events is not None
        body = {"output_file": str(output), "n_images": n_images, "overwrite": True,
                "metadata": {"benchmark": "bench_pipeline"}}
        deadline = time.monotonic() + timeout
        while True:
            try:
                request_id = self.client.request(body)
                break
            except NoRouteError:  # the agent has not subscribed yet
                if time.monotonic() > deadline:
                    raise PipelineError(f"no writer agent answered within {timeout:g} s\n{self.log_tail()}") \
                        from None
                time.sleep(0.1)
        try:
            self.events.wait(lambda e: e.get("request_id") == request_id and e.get("event") in ("started",
                                                                                                "finished"),
                             max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            raise PipelineError(f"the h5 writer did not open {output}\n{self.log_tail()}") from None
        return request_id

    def wait_written(self, request_id: str, n_images: int, sender_done: Callable[[], bool],
                     settle: float) -> WriteOutcome:
        """Wait for the request to complete; when rows stop coming for ``settle`` s after the sender
        finished (frames were lost), kill it so the file is closed, and report what was written."""
        assert self.events is not None and self.client is not None
        last_n, last_change = -1, time.monotonic()
        killed = False
        while True:
            n, first_seen, finished = self.events.written(request_id)
            if finished is not None:
                t_end = first_seen if (killed or n < n_images) and first_seen is not None else \
                    self._finished_time(request_id)
                return WriteOutcome(n, t_end, not killed and n >= n_images, finished)
            now = time.monotonic()
            if n != last_n:
                last_n, last_change = n, now
            elif not killed and sender_done() and now - last_change > settle:
                self.client.kill(request_id)
                killed = True
            time.sleep(0.02)

    def _finished_time(self, request_id: str) -> float:
        assert self.events is not None
        stamp, _ = self.events.wait(
            lambda e: e.get("request_id") == request_id and e.get("event") == "finished", 1.0)
        return stamp

    def counters(self, not_before: float, timeout: float = 5.0) -> dict[str, dict[str, int]]:
        """Each service's counters, waiting (up to ``timeout``) for snapshots taken after ``not_before``
        (``time.time()``); stale ones are returned as they are."""
        assert self.supervisor is not None
        deadline = time.monotonic() + timeout
        while True:
            services = self.supervisor.status()["services"]
            fresh = all((s.get("stats_time") or 0) >= not_before for s in services
                        if s["name"].startswith("receiver") or s["name"] == "assembler")
            if fresh or time.monotonic() > deadline:
                return {s["name"]: dict(s.get("counters", {})) for s in services}
            time.sleep(0.1)
