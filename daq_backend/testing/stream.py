"""Helpers for the stream tests: a stand-in producer for "host A" and a "host B" (its own ipc dir and
/dev/shm prefix) where stream-recv runs as a separate process tree. No tests live here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zmq

from daq_backend import ipc, testing
from daq_backend.broker import Action, BrokerClient, EmbeddedBrokerHub, EmbeddedTransport, StatusAggregator
from daq_backend.config import DetectorConfig, load_config
from daq_backend.formats import DTYPE_CODES, ImageMetadata, ImageStatus
from daq_backend.ram_buffer import RingBuffer, shm_path
from daq_backend.stream.recv import read_recv_state
from daq_backend.writer.agent import DetectorWriter
from daq_backend.writer.h5_writer import journal_path

TIMEOUT = 60.0  # generous: the machine is shared


def make_config(
    name: str | None = None, height: int = 256, width: int = 264, slots: int = 128
) -> DetectorConfig:
    """A small GigaFRoST geometry: 256x264 uint16 = 132 KiB, above pyzmq's zero-copy threshold; an image
    ring of ``slots``. Built by ``daq_backend.testing.make_config``."""
    return testing.make_config("gigafrost", 8, detector_name=name or f"st{uuid.uuid4().hex[:8]}",
                               bit_depth=16,
                               image_pixel_height=height, image_pixel_width=width, start_udp_port=50000,
                               image_ring_slots=slots)


def expected_image(config: DetectorConfig, image_id: int) -> np.ndarray:
    """Deterministic pixels for an id, so any copy of an image can be checked without keeping it."""
    h, w = config.image_shape
    pixels = (np.arange(h * w, dtype=np.uint64) * (2 * image_id + 1) + image_id) % 65521
    return pixels.astype(np.uint16).reshape(h, w)


class Producer:
    """Stands in for the assembler: owns the image ring and PUBs the 56-byte ImageMetadata, with
    the metadata also as slot metadata and ``user_2`` = write sequence (the assembler's conventions)."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.ring = RingBuffer.create(
            ipc.image_ring_name(config.detector_name), config.image_nbytes, config.image_ring_slots
        )
        self.pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(ipc.image_metadata_address(config.detector_name))
        self.metadata: dict[int, bytes] = {}
        self.order: list[int] = []

    def publish(self, image_id: int) -> bytes:
        """Write ``image_id`` into A's ring and PUBlish its metadata (every third id misses packets);
        returns the metadata."""
        h, w = self.config.image_shape
        missing = image_id % 3
        status = ImageStatus.MISSING_PACKETS if missing else ImageStatus.GOOD
        meta = ImageMetadata(
            image_id, h, w, DTYPE_CODES["uint16"], status, user_1=missing, user_2=len(self.order) + 1
        ).pack()
        self.ring.write(image_id, expected_image(self.config, image_id), meta)
        self.pub.send(meta)
        self.metadata[image_id] = meta
        self.order.append(image_id)
        return meta

    def close(self) -> None:
        """Close the PUB socket and the ring."""
        self.pub.close()
        self.ring.close()


class MetadataWatcher:
    """A plain SUB on an ImageMetadata stream, drained without blocking."""

    def __init__(self, address: str) -> None:
        self.sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(address)
        self.messages: list[bytes] = []

    @property
    def ids(self) -> list[int]:
        """The image ids of the messages received so far."""
        return [ImageMetadata.unpack(m).id for m in self.messages]

    def drain(self) -> int:
        """Take every message waiting now; returns how many were received in all."""
        while True:
            try:
                self.messages.append(self.sub.recv(zmq.NOBLOCK))
            except zmq.Again:
                return len(self.messages)

    def close(self) -> None:
        """Close the SUB socket."""
        self.sub.close()


class Host:
    """A simulated second server: its own ipc directory and /dev/shm name prefix."""

    def __init__(self, root: Path, config: DetectorConfig, label: str) -> None:
        self.dir = root / label
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"{label}{uuid.uuid4().hex[:6]}-"
        self.config = config
        self.config_file = root / f"{config.detector_name}.json"
        self.config_file.write_text(json.dumps(config.to_json_dict()))
        self.log = root / f"{label}-recv.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    @contextmanager
    def env(self) -> Iterator[None]:
        """Within the block, this process uses the host's ipc directory and /dev/shm prefix."""
        saved = {k: os.environ.get(k) for k in ("STD_DAQ_IPC_DIR", "STD_DAQ_SHM_PREFIX")}
        os.environ["STD_DAQ_IPC_DIR"] = str(self.dir)
        os.environ["STD_DAQ_SHM_PREFIX"] = self.prefix
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def process_env(self) -> dict[str, str]:
        """The environment of a process on this host."""
        env = dict(os.environ)
        env.update(STD_DAQ_IPC_DIR=str(self.dir), STD_DAQ_SHM_PREFIX=self.prefix)
        return env

    def start_receiver(self, address: str, netns: str | None = None) -> subprocess.Popen[bytes]:
        """Start stream-recv on this host (optionally in network namespace ``netns``), connected to
        ``address``."""
        cmd = [sys.executable, "-m", "daq_backend.stream.recv", str(self.config_file), "--address", address,
               "--log-level", "DEBUG"]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(cmd, env=self.process_env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def state(self) -> dict[str, int]:
        """stream-recv's state on this host (empty before it wrote one)."""
        with self.env():
            return read_recv_state(self.config) or {}

    def attach_ring(self) -> RingBuffer:
        """Attach to the host's image ring."""
        with self.env():
            return RingBuffer.attach(ipc.image_ring_name(self.config.detector_name), timeout=TIMEOUT)

    def watcher(self) -> MetadataWatcher:
        """A ``MetadataWatcher`` on the host's ImageMetadata stream."""
        with self.env():
            return MetadataWatcher(ipc.image_metadata_address(self.config.detector_name))

    def shm_names(self) -> list[str]:
        """The shared-memory names stream-recv makes on this host."""
        with self.env():
            return [ipc.image_ring_name(self.config.detector_name),
                    ipc.stream_recv_state_name(self.config.detector_name)]

    def cleanup(self) -> None:
        """SIGKILL the host's processes and remove its shared memory."""
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for name in self.shm_names():
            shm_path(name).unlink(missing_ok=True)

    def tail_log(self) -> str:
        """The end of stream-recv's log on this host."""
        return self.log.read_text()[-4000:] if self.log.exists() else ""


def write_file_main(argv: list[str] | None = None) -> int:
    """``python -c ... CONFIG OUTPUT START_ID N_IMAGES``: on the host this process runs as (its env),
    write ``N_IMAGES`` images from ``START_ID`` on out of the image ring into OUTPUT with the real
    writer agent + h5 writer, requested through an embedded broker as a user would. Prints the final
    status as JSON; exit code 0 if the request succeeded."""
    config_file, output, start_id, n_images = argv if argv is not None else sys.argv[1:]
    config = load_config(config_file)
    hub = EmbeddedBrokerHub(f"stream-{uuid.uuid4().hex[:8]}")
    hub.start()
    transport = EmbeddedTransport(hub.name)
    tag = config.detector_name
    writer = DetectorWriter(config, transport, tag=tag).start()
    aggregator = StatusAggregator(transport, tag)
    aggregator.start()
    try:
        request_id = BrokerClient(transport, tag).request(
            {"output_file": output, "n_images": int(n_images), "start_id": int(start_id)}
        )
        action, message = aggregator.wait_for_complete(request_id, TIMEOUT)["services"]["writer_agent"][-1]
        print(json.dumps({"action": str(action), "message": message}, default=str))
        return 0 if action is Action.SUCCESS else 1
    finally:
        aggregator.stop()
        writer.stop()
        transport.close()
        hub.stop()
        journal_path(config.detector_name).unlink(missing_ok=True)


def write_file(host: Host, output: Path, start_id: int, n_images: int) -> subprocess.CompletedProcess[str]:
    """Run ``write_file_main`` as a process of ``host``."""
    code = "import sys; from daq_backend.testing.stream import write_file_main; sys.exit(write_file_main())"
    return subprocess.run(
        [sys.executable, "-c", code, str(host.config_file), str(output), str(start_id), str(n_images)],
        env=host.process_env(), capture_output=True, text=True, timeout=2 * TIMEOUT,
    )


def receiver_alive(proc: subprocess.Popen[bytes], host: Host) -> None:
    """Fail, with its log, if stream-recv ``proc`` exited."""
    if proc.poll() is not None:
        raise AssertionError(f"stream-recv exited with {proc.returncode}:\n{host.tail_log()}")
