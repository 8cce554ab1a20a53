"""A whole std-daq for one simulated detector inside this Python process: the zero-set-up backend
behind the demo, the beamline profile's fallback and the device tests.

:class:`EmbeddedDaq` starts exactly what ``std-daq up`` runs as separate processes — UDP receivers,
synchroniser/assembler, writer agent + h5 writer, REST API — as threads, with the built-in UDP
detector simulator as the detector (``SimulatedDetectorControl``) and, by default, a private
embedded broker hub (``broker_url="amqp://..."`` uses RabbitMQ instead). The ophyd devices still
reach it only through its REST URL, exactly as they would reach a DAQ server.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daq_backend import ipc
from daq_backend.broker import EmbeddedBrokerHub, Transport, make_transport
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.control.simulated import SimulatedDetectorControl

log = logging.getLogger(__name__)


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


class EmbeddedDaq:
    """Readout, writer, detector simulator and REST API of one detector, in threads of this process.

    ``start()`` returns once the REST API answers (``url``); ``stop()`` undoes everything it started,
    including shared-memory rings and ipc socket files. ``output_roots``: folders the API allows
    writes to (None: anywhere)."""

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
        self.broker_url = broker_url
        self.host = host
        self.port = port
        self.output_roots = output_roots
        self.log_level = log_level
        self.hub: EmbeddedBrokerHub | None = None
        self.control = SimulatedDetectorControl(self.config, dst_ip=self.config.udp_host)
        self._transports: list[Transport] = []
        self._receivers: list[Any] = []
        self._assembler: Any = None
        self._threads: list[threading.Thread] = []
        self._writer: Any = None
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
        if self.broker_url is not None:
            return self.broker_url
        if self.hub is None:
            raise RuntimeError("the embedded DAQ is not started")
        return f"embedded://{self.hub.name}"

    def _transport(self) -> Transport:
        if self.broker_url is None:
            if self.hub is None:
                self.hub = EmbeddedBrokerHub(f"sdq-{uuid.uuid4().hex[:10]}")
                self.hub.start()
            transport = make_transport(self.transport_url)
        else:
            transport = make_transport(self.broker_url)
        self._transports.append(transport)
        return transport

    def start(self) -> EmbeddedDaq:
        from daq_backend.readout.assembler import ImageAssembler
        from daq_backend.readout.receiver import ModuleReceiver
        from daq_backend.rest import DaqBackend, RestServer, create_app
        from daq_backend.rest.server import image_ring_preview
        from daq_backend.writer.agent import DetectorWriter

        config = self.config
        try:
            self._assembler = ImageAssembler(config, stats_interval=1.0)
            for module in config.required_modules:
                self._receivers.append(ModuleReceiver(config, module, stats_interval=1.0))
            self._threads = [self._assembler.start()] + [r.start() for r in self._receivers]
            self._writer = DetectorWriter(config, self._transport()).start()
            controls = {config.detector_name: self.control, config.detector_type.value: self.control}
            self._backend = DaqBackend(
                config, self._transport(), controls=controls, preview=image_ring_preview(config),
                output_roots=self.output_roots, owns_controls=True,
            ).start()
            self._server = RestServer(create_app(self._backend), self.host, self.port, self.log_level).start()
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
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        for receiver in self._receivers:
            receiver.stop()
        if self._assembler is not None:
            self._assembler.stop()
        for thread in self._threads:
            thread.join(30)
        for receiver in self._receivers:
            receiver.close()
        if self._assembler is not None:
            self._assembler.close()
        self._receivers, self._assembler, self._threads = [], None, []
        for transport in self._transports:
            transport.close()
        self._transports = []
        if self.hub is not None:
            self.hub.stop()
            self.hub = None
        self._remove_ipc_files()

    def _remove_ipc_files(self) -> None:
        """Socket and journal files of this detector that a thread's owner did not remove."""
        from daq_backend.writer.h5_writer import journal_path

        name = self.config.detector_name
        addresses = (ipc.module_frames_address, ipc.image_metadata_address, ipc.writer_agent_address,
                     ipc.writer_status_address, ipc.stats_address)
        for address in addresses:
            ipc.unlink_ipc(address(name))
        for path in (journal_path(name), Path(ipc.status_file(name))):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> EmbeddedDaq:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
