"""Test helpers for the writer: a stand-in assembler (image ring + ImageMetadata PUB), an embedded
broker per test, and a writer service wired to both.

The fake assembler does exactly what the real one promises downstream: it writes each image into
the image ring slot, commits the slot with the 56-byte ``ImageMetadata`` as slot metadata, then
PUBlishes the same bytes on ``ipc.image_metadata_address``. Image pixels are a function of the id
(``expected_pixels``) so a file can be checked pixel by pixel.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daq_backend import ipc, testing
from daq_backend.broker import (
    Action,
    BrokerClient,
    StatusAggregator,
    StatusMessage,
    Transport,
)
from daq_backend.config import DetectorConfig
from daq_backend.formats import DTYPE_CODES, ImageMetadata, ImageStatus, StoreOp, StoreStream
from daq_backend.ram_buffer import RingBuffer
from daq_backend.testing import WAIT_S
from daq_backend.writer.agent import DetectorWriter
from daq_backend.writer.h5_writer import journal_path


def unique(prefix: str) -> str:
    """``prefix`` and ten random hex digits (a name no other test uses)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_config(
    name: str | None = None, *, slots: int = 64, n_modules: int = 1, **extra: Any
) -> DetectorConfig:
    """A Jungfrau of ``n_modules`` stacked modules (1 MiB uint16 images per module) with an image ring
    of ``slots``, for the writer's tests (no UDP is received: the port is fixed). Built by
    ``daq_backend.testing.make_config``; ``extra`` fields override."""
    return testing.make_config("jungfrau", n_modules, detector_name=name or unique("wtest"),
                               start_udp_port=50000,
                               image_ring_slots=slots, **extra)


def expected_pixels(config: DetectorConfig, image_id: int) -> np.ndarray:
    """Pixels of image ``image_id``: a ramp shifted by the id (every image differs, compresses well)."""
    h, w = config.image_shape
    ramp = np.arange(h * w, dtype=np.uint32).reshape(h, w)
    return ((ramp + image_id * 7919) % 65521).astype(config.image_dtype)


class FakeAssembler:
    """Owns the detector's image ring and PUBlishes ImageMetadata, like the real assembler."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.ring = RingBuffer.create(ipc.image_ring_name(config.detector_name), config.image_nbytes,
                                      config.image_ring_slots)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.pub = self._ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(ipc.image_metadata_address(config.detector_name))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.next_id = 1
        h, w = config.image_shape
        self._code = DTYPE_CODES[config.image_dtype]
        self._h, self._w = h, w

    def metadata(self, image_id: int, status: int = ImageStatus.GOOD, n_missing: int = 0) -> ImageMetadata:
        """The ImageMetadata of image ``image_id`` with ``status`` and ``n_missing`` packets."""
        return ImageMetadata(image_id, self._h, self._w, self._code, status, user_1=n_missing)

    def produce(self, image_id: int, *, status: int = ImageStatus.GOOD, n_missing: int = 0,
                publish: bool = True, pixels: np.ndarray | None = None) -> None:
        """Write image ``image_id`` into its ring slot and (with ``publish``) PUBlish its metadata."""
        packed = self.metadata(image_id, status, n_missing).pack()
        data = expected_pixels(self.config, image_id) if pixels is None else pixels
        with self._lock:
            self.ring.write(image_id, data, packed)
            if publish:
                self.pub.send(packed)

    def emit(self, image_id: int, publish: bool = True) -> None:
        """Produce ``image_id`` the way the background loop does (status from ``status_of``)."""
        status, missing = self.status_of(image_id)
        self.produce(image_id, status=status, n_missing=missing, publish=publish)

    def status_of(self, image_id: int) -> tuple[int, int]:
        """(status, n_missing_packets) this producer gives an id: every 10th image misses packets."""
        return (ImageStatus.MISSING_PACKETS, 3) if image_id % 10 == 0 else (ImageStatus.GOOD, 0)

    def start(self, rate_hz: float = 200.0) -> FakeAssembler:
        """Produce ids next_id, next_id+1, ... at ``rate_hz`` in a thread until ``stop()``."""
        self._stop.clear()

        def loop() -> None:
            period = 1.0 / rate_hz
            next_time = time.monotonic()
            while not self._stop.is_set():
                self.emit(self.next_id)
                self.next_id += 1
                next_time += period
                delay = next_time - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_time = time.monotonic()

        self._thread = threading.Thread(target=loop, name="fake-assembler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background loop of ``start``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def close(self) -> None:
        """Stop, close the PUB socket and the ring."""
        self.stop()
        self.pub.close()
        ipc.unlink_ipc(ipc.image_metadata_address(self.config.detector_name))
        self.ring.close()


class Driver:
    """Plays the writer agent for an h5 writer under test: PUSHes StoreStream messages to it and reads
    its status events."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.push: zmq.Socket[bytes] = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind(ipc.writer_agent_address(config.detector_name))
        self.sub: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(ipc.writer_status_address(config.detector_name))
        self.run_id = 0

    def event(self, wanted: str, request_id: str | None = None) -> dict[str, Any]:
        """The next status event named ``wanted`` (of ``request_id``, if given); fails after ``WAIT_S``."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.sub.poll(100):
                event = json.loads(self.sub.recv())
                if event["event"] == wanted and (request_id is None or event.get("request_id") == request_id):
                    return event
        raise AssertionError(f"no {wanted!r} event within {WAIT_S} s")

    def send(self, op: StoreOp, request_id: str, output_file: str, n_images: int, i_image: int = 0,
             meta: ImageMetadata | None = None, **extra: Any) -> None:
        """PUSH one StoreStream message of ``op`` for the current run."""
        self.push.send(StoreStream(
            output_file=output_file, run_id=self.run_id, n_images=n_images,
            image_id=meta.id if meta else 0, i_image=i_image, op=op, request_id=request_id,
            metadata=meta.pack().hex() if meta else "", **extra,
        ).to_json())

    def start(self, output_file: Path, n_images: int, **request: Any) -> str:
        """Start a new run writing ``n_images`` to ``output_file``; returns its request id."""
        self.run_id += 1
        request_id = str(uuid.uuid4())
        body = {"output_file": str(output_file), "n_images": n_images, **request}
        self.send(StoreOp.START, request_id, str(output_file), n_images, request=body)
        return request_id

    def close(self) -> None:
        """Close the sockets and remove the ipc endpoint."""
        self.push.close()
        self.sub.close()
        ipc.unlink_ipc(ipc.writer_agent_address(self.config.detector_name))


class Harness:
    """A detector config, its fake assembler, an embedded broker, a client and an aggregator."""

    def __init__(self, tmp_path: Path, config: DetectorConfig, transport: Transport) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.transport = transport
        self.tag = config.detector_name
        self.broker_url: str = getattr(transport, "broker_url", "")
        self.assembler = FakeAssembler(config)
        self.aggregator = StatusAggregator(transport, self.tag)
        self.aggregator.start()
        self.statuses: list[StatusMessage] = []
        self.aggregator.add_listener(self.statuses.append)
        self.client = BrokerClient(transport, self.tag)
        self.writer: DetectorWriter | None = None

    def start_writer(self, **options: Any) -> DetectorWriter:
        """Start a ``DetectorWriter`` of the detector on the harness's broker."""
        self.writer = DetectorWriter(self.config, self.transport, tag=self.tag, **options).start()
        return self.writer

    def request(self, **body: Any) -> str:
        """Send a write request; returns its id."""
        return self.client.request(body)

    def wait(self, request_id: str, timeout: float = WAIT_S) -> dict[str, Any]:
        """The request's complete status (every service final)."""
        return self.aggregator.wait_for_complete(request_id, timeout)

    def final(self, request_id: str, timeout: float = WAIT_S) -> tuple[Action, Any]:
        """(action, message) of the writer's final status."""
        done = self.wait(request_id, timeout)
        return done["services"]["writer_agent"][-1]

    def progress(self, request_id: str) -> list[Any]:
        """Every progress message of the request received so far."""
        return [s.message for s in list(self.statuses)
                if s.request_id == request_id and s.action is Action.PROGRESS]

    def close(self) -> None:
        """Stop writer, aggregator and fake assembler; remove the writer's journal."""
        if self.writer is not None:
            self.writer.stop()
        self.aggregator.stop()
        self.assembler.close()
        journal_path(self.config.detector_name).unlink(missing_ok=True)

