"""Test helpers of the REST API: a whole DAQ of one detector in the test process, served by uvicorn.

Embedded broker hub (unique name), the real writer (agent + h5 writer), a detector control, the
``DaqBackend`` and a real HTTP server on a free port. Images come from the writer tests' stand-in
assembler (``FakeAssembler``) or, for the full flow, from the real readout fed by the simulated
detector.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx

from daq_backend.broker import EmbeddedBrokerHub, EmbeddedTransport
from daq_backend.config import DetectorConfig
from daq_backend.control.base import DetectorControl
from daq_backend.control.simulated import SimulatedDetectorControl
from daq_backend.rest import DaqBackend, RestServer, create_app
from daq_backend.testing import WAIT_S, make_config, wait_for
from daq_backend.testing.writer import FakeAssembler
from daq_backend.writer.agent import DetectorWriter
from daq_backend.writer.h5_writer import journal_path

__all__ = ["RestHarness", "WAIT_S"]


class RestHarness:
    """One detector's DAQ behind a live REST API; every part can be left out or replaced."""

    def __init__(
        self,
        tmp_path: Path,
        config: DetectorConfig | None = None,
        *,
        assembler: bool = True,
        writer: bool = True,
        controls: dict[str, DetectorControl] | None = None,
        token: str | None = None,
        **backend_options: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.data = tmp_path / "data"
        self.data.mkdir(exist_ok=True)
        self.config = config or make_config("jungfrau")
        self.hub = EmbeddedBrokerHub(f"rt-{uuid.uuid4().hex[:10]}")
        self.hub.start()
        self.transport = EmbeddedTransport(self.hub.name)
        self.assembler = FakeAssembler(self.config) if assembler else None
        # the writer has a connection of its own, as the process it is in production
        self.writer_transport = EmbeddedTransport(self.hub.name)
        roots = backend_options.get("output_roots", [self.data])  # the writer's are the API's, as in `up`
        self.writer = DetectorWriter(self.config, self.writer_transport, output_roots=roots).start() \
            if writer else None
        if controls is None:
            control = SimulatedDetectorControl(self.config)
            controls = {self.config.detector_name: control, self.config.detector_type.value: control}
        self.controls = controls
        options: dict[str, Any] = {"output_roots": [self.data], "owns_controls": True}
        options.update(backend_options)
        self.backend = DaqBackend(self.config, self.transport, controls=controls, **options).start()
        self.server = RestServer(create_app(self.backend, token), port=0).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=WAIT_S)

    @property
    def url(self) -> str:
        """Base URL of the live REST API."""
        return self.server.url

    @property
    def control(self) -> DetectorControl:
        """The detector control of the harness's detector."""
        return self.controls[self.config.detector_name]

    def file(self, name: str) -> str:
        """A path for an output file ``name`` inside the harness's data folder."""
        return str(self.data / name)

    def wait_state(self, request_id: str, *states: str, timeout: float = WAIT_S) -> dict[str, Any]:
        """Poll GET /requests/{id} until its state is one of ``states``."""
        answer: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal answer
            answer = self.http.get(f"/requests/{request_id}").json()
            return answer.get("state") in states

        wait_for(reached, f"request {request_id} to reach {states} (last: {answer})", timeout)
        return answer

    def wait_writing(self, request_id: str, timeout: float = WAIT_S) -> dict[str, Any]:
        """Wait until the writer takes images for the request: its file exists and it reported
        progress (images published before that are not part of the request: "the next n images")."""
        answer: dict[str, Any] = {}

        def ready() -> bool:
            nonlocal answer
            answer = self.http.get(f"/requests/{request_id}").json()
            return "request_progress" in answer.get("services", {}).values() or answer.get("n_written", 0) > 0

        wait_for(ready, f"request {request_id} to take images (last: {answer})", timeout)
        return answer

    def stop_writer(self) -> None:
        """Stop the writer (the API then sees no writer)."""
        if self.writer is not None:
            self.writer.stop()
            self.writer = None

    def close(self) -> None:
        """Stop server, backend, writer, assembler and broker; remove the writer's journal."""
        self.http.close()
        self.server.stop()
        self.backend.close()
        self.stop_writer()
        if self.assembler is not None:
            self.assembler.close()
        self.writer_transport.close()
        self.transport.close()
        self.hub.stop()
        journal_path(self.config.detector_name).unlink(missing_ok=True)
