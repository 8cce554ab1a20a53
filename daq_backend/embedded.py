"""A whole std-daq for one simulated detector, started from Python: behind ``std-daq demo``, the
beamline profile's fallback and the device tests.

* :class:`LocalDaq` runs exactly what ``std-daq up`` runs — the processes of the detector's
  :class:`~daq_backend.topology.Topology` (receivers, assembler, h5 writer, writer agent, REST API)
  under a :class:`~daq_backend.supervisor.Supervisor` in a thread of this process, on a private
  embedded broker hub (``broker_url="amqp://..."``: RabbitMQ). The REST API drives the built-in UDP
  detector simulator; :attr:`LocalDaq.control` reaches it through the API.
* :class:`EmbeddedDaq` builds the same roles as threads of this process (no process start-up, and a
  test can reach into the components: inject faults into the simulated detector, look at a ring).

Either way the ophyd devices reach the DAQ only through its REST URL, exactly as they would reach a
DAQ server, and ``stop()`` removes everything it started, shared-memory rings and ipc files included.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from daq_backend import ipc
from daq_backend.broker import EmbeddedBrokerHub, Transport, make_transport
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.control.base import DetectorCommandError, DetectorStateError, ParameterError
from daq_backend.control.simulated import SimulatedDetectorControl
from daq_backend.topology import Role, Topology

log = logging.getLogger(__name__)

#: seconds to wait for the processes of a LocalDaq to be ready (a busy machine starts them slowly)
STARTUP_TIMEOUT = 180.0


def free_udp_base(n: int, host: str = "127.0.0.1") -> int:
    """A port p such that p .. p+n-1 are free UDP ports on ``host`` right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free UDP ports found on {host}")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def simulated_config(detector_type: str = "jungfrau", n_modules: int = 1, name: str | None = None,
                     **fields: Any) -> DetectorConfig:
    """A detector config on free UDP ports with a unique name (two simulations never collide).

    Jungfrau modules are stacked vertically (512 x 1024 each); small rings keep ``/dev/shm`` use low."""
    data: dict[str, Any] = {
        "detector_name": name or f"sim-{uuid.uuid4().hex[:8]}",
        "detector_type": detector_type,
        "n_modules": n_modules,
        "bit_depth": 16,
        "start_udp_port": free_udp_base(n_modules),
        "frame_ring_slots": 64,
        "image_ring_slots": 64,
        "module_sync_timeout": 2.0,
    }
    if detector_type == "jungfrau":
        data.update(image_pixel_height=512 * n_modules, image_pixel_width=1024)
    data.update(fields)
    return parse_config(data)


class _Broker:
    """The DAQ's broker: RabbitMQ at ``broker_url``, else a private embedded hub owned here."""

    def __init__(self, broker_url: str | None) -> None:
        self.broker_url = broker_url
        self.hub: EmbeddedBrokerHub | None = None

    @property
    def url(self) -> str:
        if self.broker_url is not None:
            return self.broker_url
        if self.hub is None:
            self.hub = EmbeddedBrokerHub(f"sdq-{uuid.uuid4().hex[:10]}")
            self.hub.start()
        return f"embedded://{self.hub.name}"

    def stop(self) -> None:
        if self.hub is not None:
            self.hub.stop()
            self.hub = None


class RestDetectorControl:
    """The detector control of a DAQ's REST API, seen from outside (``GET/POST /detector/<name>``):
    what a test or a script asks a :class:`LocalDaq`'s simulated detector."""

    def __init__(self, url: str, name: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._http.post(f"/detector/{self.name}", json=body)
        data: dict[str, Any] = answer.json()
        if answer.status_code == 400:
            raise ParameterError("config", str(data.get("response")))
        if answer.status_code == 409:
            raise DetectorStateError(str(data.get("response")))
        if answer.status_code >= 300:
            raise DetectorCommandError(f"HTTP {answer.status_code}: {data.get('response', data)}")
        return data

    def get_config(self) -> dict[str, Any]:
        answer = self._http.get(f"/detector/{self.name}")
        answer.raise_for_status()
        return dict(answer.json())

    def set_config(self, values: dict[str, Any]) -> dict[str, Any]:
        self._post({"config": values})
        return self.get_config()

    def start(self) -> None:
        self._post({"cmd": "START"})

    def stop(self) -> None:
        self._post({"cmd": "STOP"})

    def status(self) -> str:
        return str(self._post({"cmd": "STATUS"})["status"])

    def close(self) -> None:
        self._http.close()


class LocalDaq:
    """The processes ``std-daq up`` runs for one simulated detector, supervised from this process.

    ``start()`` returns once every process reported in and the REST API answers (``url``);
    ``stop()`` stops them all and removes what they left. ``output_roots``: folders files may be
    written in, given to the h5 writer, writer agent and REST API (None: ``STD_DAQ_OUTPUT_ROOTS``,
    else the default data root). ``log_level``: of the processes (their output goes to this process's
    stderr). ``host``: run only that host's share of a config with ``readout_hosts``
    (``DetectorConfig.for_host``), as ``std-daq up CONFIG --host HOST`` does."""

    def __init__(
        self,
        config: DetectorConfig | None = None,
        *,
        broker_url: str | None = None,
        port: int = 0,
        output_roots: Sequence[str | Path] | None = None,
        log_level: str = "warning",
        startup_timeout: float = STARTUP_TIMEOUT,
        host: str | None = None,
    ) -> None:
        self.config = config or simulated_config()
        if host is not None:  # one host's share of a detector split over readout_hosts
            self.config = self.config.for_host(host)
        self.port = port
        self.output_roots = output_roots
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self._broker = _Broker(broker_url)
        self.supervisor: Any = None
        self._thread: threading.Thread | None = None
        self._control: RestDetectorControl | None = None
        self._url: str | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the local DAQ is not started")
        return self._url

    @property
    def detector_name(self) -> str:
        return self.config.detector_name

    @property
    def transport_url(self) -> str:
        """Broker URL of this DAQ, for services added next to it (e.g. an EPICS writer)."""
        return self._broker.url

    @property
    def control(self) -> RestDetectorControl:
        """The simulated detector, through the REST API."""
        if self._control is None:
            self._control = RestDetectorControl(self.url, self.detector_name)
        return self._control

    def topology(self, port: int) -> Topology:
        roots = tuple(str(Path(r).absolute()) for r in self.output_roots or ())
        return Topology(self.config, Path(ipc.config_file(self.detector_name)), self._broker.url,
                        rest_port=port, rest_args=("--detector-control", "simulated"), output_roots=roots,
                        log_level=self.log_level)

    def start(self, wait: bool = True) -> LocalDaq:
        """Start the processes; with ``wait=False`` return at once (``wait_ready()`` waits)."""
        from daq_backend.supervisor import Supervisor

        port = self.port or free_tcp_port()
        try:
            self.supervisor = Supervisor(self.config, topology=self.topology(port), status_interval=0.5)
            self.supervisor.check_can_start()
            # Every process is started from the supervisor's own thread: their PR_SET_PDEATHSIG fires
            # when the *thread* that started them ends, so not the caller's thread, which may end first.
            self._thread = threading.Thread(target=self._supervise, daemon=True,
                                            name=f"supervisor-{self.detector_name}")
            self._thread.start()
            self._url = f"http://127.0.0.1:{port}"
            if wait:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _supervise(self) -> None:
        try:
            self.supervisor.run()
        except BaseException as exc:  # wait_ready reports it
            self._error = exc
            log.exception("%s: the supervisor failed", self.detector_name)

    def wait_ready(self) -> LocalDaq:
        """Wait until every process reported in and the REST API answers (stops all on failure)."""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("local std-daq of %s: %s", self.detector_name, self._url)
        return self

    def _wait_ready(self) -> None:
        if self.supervisor is None:
            raise RuntimeError("the local DAQ is not started")
        deadline = time.monotonic() + self.startup_timeout
        specs = {s.name: s for s in self.supervisor.services}
        while True:
            if self._error is not None:
                error = self._error
                raise RuntimeError(f"{self.detector_name}: the supervisor failed: {error}") from error
            status = self.supervisor.status()
            dead = [s["name"] for s in status["services"] if s["exit_code"] is not None]
            if dead:
                raise RuntimeError(f"{self.detector_name}: {', '.join(dead)} exited while starting "
                                   "(its output above says why)")
            waiting = [s["name"] for s in status["services"]
                       if not s["alive"] or (specs[s["name"]].reports_stats and not s["counters"])]
            if not waiting and self._rest_healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.detector_name}: not ready within {self.startup_timeout:g} s "
                                   f"(waiting for {', '.join(waiting) or 'the REST API'})")
            time.sleep(0.1)

    def _rest_healthy(self) -> bool:
        try:
            return httpx.get(f"{self._url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop everything started (safe to call twice, or after a failed ``start``)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.supervisor is not None:
            self.supervisor.stop()
            if self._thread is not None:
                self._thread.join(120)
                self._thread = None
            self.supervisor.shutdown()  # a no-op after run() ended; else it undoes a partial start
            self.supervisor = None
        self._broker.stop()

    def __enter__(self) -> LocalDaq:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedDaq:
    """The roles of one detector's topology as threads of this process, with the built-in UDP
    detector simulator as the detector (``control``).

    ``start()`` returns once the REST API answers (``url``); ``stop()`` undoes everything it started,
    including shared-memory rings and ipc socket files. ``output_roots``: folders files may be
    written in (None: ``STD_DAQ_OUTPUT_ROOTS``, else the default data root). A config change
    through the API is refused (nothing here restarts threads); :class:`LocalDaq` applies it."""

    def __init__(
        self,
        config: DetectorConfig | None = None,
        *,
        broker_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        output_roots: Sequence[str | Path] | None = None,
        log_level: str = "warning",
    ) -> None:
        self.config = config or simulated_config()
        self.host = host
        self.port = port
        self.output_roots = output_roots
        self.log_level = log_level
        self._broker = _Broker(broker_url)
        self.control = SimulatedDetectorControl(self.config, dst_ip=self.config.udp_host)
        self._transports: list[Transport] = []
        self._components: list[Any] = []  # started, in start order
        self._threads: list[threading.Thread] = []
        self._backend: Any = None
        self._server: Any = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the embedded DAQ is not started")
        return str(self._server.url)

    @property
    def detector_name(self) -> str:
        return self.config.detector_name

    @property
    def transport_url(self) -> str:
        """Broker URL of this DAQ, for services added next to it (e.g. an EPICS writer)."""
        return self._broker.url

    def _transport(self) -> Transport:
        transport = make_transport(self.transport_url)
        self._transports.append(transport)
        return transport

    def start(self) -> EmbeddedDaq:
        from daq_backend.readout.assembler import ImageAssembler
        from daq_backend.readout.receiver import ModuleReceiver
        from daq_backend.rest import DaqBackend, RestServer, create_app
        from daq_backend.rest.server import image_ring_preview
        from daq_backend.writer.agent import WriterAgent
        from daq_backend.writer.h5_writer import H5Writer

        config = self.config
        topology = Topology(config, Path(ipc.config_file(self.detector_name)), self.transport_url,
                            rest_port=self.port)
        try:
            for spec in topology.services():
                if spec.role is Role.RECEIVER:
                    assert spec.module is not None
                    receiver = ModuleReceiver(config, spec.module, stats_interval=1.0)
                    self._components.append(receiver)
                    self._threads.append(receiver.start())
                elif spec.role is Role.ASSEMBLER:
                    assembler = ImageAssembler(config, stats_interval=1.0)
                    self._components.append(assembler)
                    self._threads.append(assembler.start())
                elif spec.role is Role.H5_WRITER:
                    roots = [Path(r) for r in self.output_roots] if self.output_roots else None
                    h5_writer = H5Writer(config, output_roots=roots, writer_index=spec.writer_index)
                    h5_writer.start()
                    self._components.append(h5_writer)
                elif spec.role is Role.WRITER_AGENT:
                    roots = [Path(r) for r in self.output_roots] if self.output_roots else None
                    agent = WriterAgent(config, self._transport(), output_roots=roots)
                    self._components.append(agent.start())
                elif spec.role is Role.REST:
                    controls = {config.detector_name: self.control, config.detector_type.value: self.control}
                    self._backend = DaqBackend(
                        config, self._transport(), controls=controls, preview=image_ring_preview(config),
                        output_roots=self.output_roots, owns_controls=True,
                    ).start()
                    self._server = RestServer(create_app(self._backend), self.host, self.port,
                                              self.log_level).start()
        except BaseException:
            self.stop()
            raise
        log.info("embedded std-daq of %s: %s", config.detector_name, self._server.url)
        return self

    def stop(self) -> None:
        """Stop everything started (safe to call twice, or after a failed ``start``)."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._backend is not None:
            self._backend.close()  # closes the detector control too
            self._backend = None
        else:
            self.control.close()
        for component in reversed(self._components):  # downstream first
            component.stop()
        for thread in self._threads:
            thread.join(30)
        for component in self._components:
            close = getattr(component, "close", None)
            if close is not None:
                close()
        self._components, self._threads = [], []
        for transport in self._transports:
            transport.close()
        self._transports = []
        self._broker.stop()
        self._remove_ipc_files()

    def _remove_ipc_files(self) -> None:
        """Socket and journal files of this detector that a thread's owner did not remove."""
        from daq_backend.writer.h5_writer import journal_path

        name = self.config.detector_name
        addresses = (ipc.image_metadata_address, ipc.stats_address)
        for address in addresses:
            ipc.unlink_ipc(address(name))
        indices = ipc.writer_indices(self.config.n_writers)
        for index in indices:
            ipc.unlink_ipc(ipc.writer_agent_address(name, index))
            ipc.unlink_ipc(ipc.writer_status_address(name, index))
        for path in (*(journal_path(name, index) for index in indices), Path(ipc.status_file(name))):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> EmbeddedDaq:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

