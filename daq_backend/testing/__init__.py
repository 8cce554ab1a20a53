"""Helpers for testing code that uses std-daq, shipped with the package (as ``ophyd_async.testing``).

- Detectors of their own: ``make_config`` (a unique detector name, free UDP ports, rings sized for a
  test), ``free_udp_base``, ``free_tcp_port``; the module positions of common layouts
  (``JF4_POSITIONS``, ``EIGER_POSITIONS``, ``EIGER_HALF_POSITIONS``).
- Waiting: ``wait_for(predicate, what, timeout)`` polls a condition with a deadline (``WAIT_S`` by
  default) and names what it waited for; ``healthy`` asks a REST API's ``/health``; ``pid_alive``;
  ``RABBITMQ_URL`` is the machine's broker.
- Leftovers: ``shm_segments`` lists a detector's rings in ``/dev/shm``, ``assert_no_leftovers``
  checks that neither rings nor ipc sockets of a detector remain.
- The readout in this process: ``UdpSender`` sends chosen datagrams to a detector's ports,
  ``ReceiverHarness`` runs one module receiver and records every frame it commits,
  ``InProcessReadout`` runs the receivers and the assembler as threads and reads the image ring;
  ``run_simulator`` sends the built-in simulator's images, ``check_images`` compares the ring with them.

Submodules: ``daq_backend.testing.writer`` (a stand-in assembler and a writer on an embedded broker),
``daq_backend.testing.rest`` (a whole DAQ behind a live REST API in this process),
``daq_backend.testing.stream`` (the two hosts of buffer replication),
``daq_backend.testing.broker_proxy`` (a RabbitMQ proxy a test can cut),
``daq_backend.testing.epics`` (a synthetic EPICS buffer with known contents),
``daq_backend.testing.up`` (``std-daq up`` as separate processes, driven over REST and the broker).
The ophyd devices' helpers are in ``std_daq_ophyd.testing``.

A process's ipc directory comes from ``STD_DAQ_IPC_DIR``: point it at a short private folder per test
(unix socket paths are limited to 107 bytes), as the ``ipc_env`` fixture of this repository's
``tests/conftest.py`` does.
"""

from __future__ import annotations

import os
import queue
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests
import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.detectors import layout_for
from daq_backend.formats import ImageMetadata, ImageStatus, ModuleFrame
from daq_backend.ram_buffer import SHM_DIR, RingBuffer
from daq_backend.readout.assembler import ImageAssembler
from daq_backend.readout.receiver import ModuleReceiver
from daq_backend.simulator.pattern import expected_image
from daq_backend.simulator.sender import DetectorSimulator

JF4_POSITIONS = {"0": [0, 0, 1023, 511], "1": [0, 512, 1023, 1023], "2": [1024, 0, 2047, 511],
                 "3": [1024, 512, 2047, 1023]}
EIGER_POSITIONS = {"0": [0, 0, 513, 255], "1": [516, 0, 1029, 255], "2": [0, 513, 513, 258],
                   "3": [516, 513, 1029, 258]}
EIGER_HALF_POSITIONS = {"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]}  # one module's two halves


#: the machine's RabbitMQ (guest account, default vhost)
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

#: how long ``wait_for`` waits by default: generous, a shared test machine may be ten times slower
WAIT_S = 120.0


def wait_for(predicate: Callable[[], Any], what: str = "condition", timeout: float = WAIT_S, *,
             interval: float = 0.01, ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and return that.

    Raises ``AssertionError("timed out after <timeout> s waiting for <what>")`` once ``timeout`` seconds
    have passed, so a test that waits for a condition fails naming it. The predicate is called one last
    time after the deadline: a condition met just then still counts. An exception of a type in
    ``ignore`` (say ``requests.ConnectionError`` while a server starts) counts as "not yet"."""
    if not isinstance(what, str):
        raise TypeError(f"wait_for(predicate, what, timeout): what must name the condition, got {what!r}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_udp_base(n: int) -> int:
    """A port p such that p..p+n-1 are free UDP ports on 127.0.0.1 right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free UDP ports found")


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(url: str) -> bool:
    """Whether the REST API at ``url`` answers ``GET /health`` (False while nothing listens)."""
    try:
        return requests.get(f"{url}/health", timeout=5).ok
    except requests.ConnectionError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie counts as alive until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def make_config(detector_type: str = "jungfrau", n_modules: int = 1, **fields: Any) -> DetectorConfig:
    """A detector with a unique name and free ports, rings that hold a whole test's images (threads
    of one process share the GIL: a burst is received faster than assembled) and a generous sync
    timeout so a heavily loaded machine does not evict images a test expects complete.

    ``fields`` are config fields and override these defaults (``detector_name``, ``start_udp_port``,
    ``image_ring_slots``, ...); a Jungfrau gets the geometry of ``n_modules`` stacked modules."""
    defaults: dict[str, Any] = {"bit_depth": 16, "frame_ring_slots": 32, "image_ring_slots": 32,
                                "module_sync_timeout": 8.0}
    if detector_type == "jungfrau":
        defaults.update(image_pixel_height=512 * n_modules, image_pixel_width=1024)
    data = {
        **defaults,
        "detector_name": f"t{uuid.uuid4().hex[:10]}",
        "detector_type": detector_type,
        "n_modules": n_modules,
        **fields,
    }
    if "start_udp_port" not in data:
        data["start_udp_port"] = free_udp_base(n_modules)
    return parse_config(data)


def shm_segments(detector_name: str) -> list[str]:
    """This detector's rings in ``/dev/shm`` (under this process's ``STD_DAQ_SHM_PREFIX``), including
    one still being built (``.<name>.<pid>.creating``)."""
    prefix = f"{ipc.shm_prefix()}std-daq-{detector_name}-"
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith((prefix, f".{prefix}")))


class UdpSender:
    """Sends datagrams of chosen modules to their ports (tests decide exactly what goes out)."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)

    def send(self, module_id: int, datagrams: Sequence[bytes]) -> None:
        """Send ``datagrams`` to module ``module_id``'s UDP port, in order."""
        address = (self.config.udp_host, self.config.udp_port(module_id))
        for d in datagrams:
            self.sock.sendto(d, address)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class InProcessReadout:
    """Receivers (one per required module) and the assembler, each in a thread of this process.

    The image ring is the ground truth the tests read; ``metadata`` collects what the assembler
    PUBlished (a SUB may miss the first messages of a PUB, so tests check it against the ring)."""

    def __init__(self, config: DetectorConfig, **receiver_kwargs: Any) -> None:
        self.config = config
        self.assembler = ImageAssembler(config, stats_interval=0.2)
        self.receivers: dict[int, ModuleReceiver] = {}
        try:
            # a long late window: duplicates are recognised even if this busy machine delays them
            receiver_kwargs.setdefault("late_window", 60.0)
            for m in config.required_modules:
                self.receivers[m] = ModuleReceiver(config, m, stats_interval=0.2, **receiver_kwargs)
        except BaseException:
            self.close()
            raise
        self.ring = RingBuffer.attach(ipc.image_ring_name(config.detector_name), timeout=5)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(ipc.image_metadata_address(config.detector_name))
        self.metadata: list[ImageMetadata] = []
        self._running = threading.Event()
        self._threads = [self.assembler.start()] + [r.start() for r in self.receivers.values()]
        self._sub_thread = threading.Thread(target=self._collect, daemon=True)
        self._running.set()
        self._sub_thread.start()
        self.sender = UdpSender(config)

    def _collect(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        while self._running.is_set():
            if poller.poll(50):
                self.metadata.append(ImageMetadata.unpack(self._sub.recv()))

    def wait_images(self, n: int, timeout: float = 120.0) -> None:
        """Wait until the assembler has assembled ``n`` images."""
        wait_for(lambda: self.assembler.stats.images >= n, f"{n} images ({self.assembler.stats})", timeout)

    def image(self, image_id: int) -> tuple[ImageMetadata, np.ndarray]:
        """(slot metadata, copy of the image) of ``image_id`` from the image ring."""
        meta = ImageMetadata.unpack(self.ring.meta(image_id, ImageMetadata.FORMAT.size))
        data = self.ring.view(image_id)
        image = np.array(data.view(meta.numpy_dtype)[: meta.height * meta.width].reshape(meta.shape))
        self.ring.check(image_id)
        return meta, image

    def close(self) -> None:
        """Stop the threads, then close receivers, assembler, rings and sockets."""
        for r in self.receivers.values():
            r.stop()
        self.assembler.stop()
        for t in getattr(self, "_threads", []):
            t.join(30)
        if hasattr(self, "_running"):
            self._running.clear()
            self._sub_thread.join(5)
            self._sub.close()
            self.sender.close()
            self.ring.close()
        for r in self.receivers.values():
            r.close()
        self.assembler.close()

    def __enter__(self) -> InProcessReadout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReceiverHarness:
    """A receiver in a thread and its frame ring. ``next_frame`` returns the receiver's commits in
    order, as the ``ModuleFrame`` each carried as slot metadata when it was committed (recorded at the
    commit: the tests' tiny rings are lapped before a reader could look), checked against the ring's
    commit log, which is what the assembler follows."""

    def __init__(self, config: DetectorConfig, module_id: int = 0, **kwargs: object) -> None:
        self.config = config
        self.layout = layout_for(config)
        self.receiver = ModuleReceiver(config, module_id, stats_interval=0.2, **kwargs)  # type: ignore[arg-type]
        self.ring = RingBuffer.attach(ipc.frame_ring_name(config.detector_name, module_id), timeout=5)
        self.commits: queue.Queue[tuple[int, bytes]] = queue.Queue()
        own = self.receiver.ring
        commit = own.commit

        def recording_commit(image_id: int, meta: bytes = b"") -> None:
            seq = own.committed
            commit(image_id, meta)
            self.commits.put((seq, meta[: ModuleFrame.FORMAT.size]))

        own.commit = recording_commit  # type: ignore[method-assign]
        self.thread = self.receiver.start()
        self.sender = UdpSender(config)
        self.module_id = module_id

    def frame(self, image_id: int, fill: int) -> bytes:
        """A frame whose 16-bit words are ``fill`` + the word index (so misplaced packets show)."""
        words = (np.arange(self.layout.frame_nbytes // 2, dtype=np.uint32) + fill) % 65000 + 1
        return words.astype("<u2").tobytes()

    def datagrams(self, image_id: int, fill: int, **kwargs: int) -> list[bytes]:
        """The datagrams of image ``image_id`` with the ``frame`` of ``fill`` (``kwargs`` go to the
        layout's encoder)."""
        return self.layout.encode_datagrams(self.module_id, self.frame(image_id, fill), image_id, **kwargs)

    def send(self, datagrams: list[bytes]) -> None:
        """Send ``datagrams`` to the receiver's port."""
        self.sender.send(self.module_id, datagrams)

    def next_frame(self, timeout: float = 60.0) -> ModuleFrame:
        """The next frame the receiver committed (fails after ``timeout`` s, naming its stats)."""
        try:
            seq, meta = self.commits.get(timeout=timeout)
        except queue.Empty:
            stats = self.receiver.stats
            raise AssertionError(f"no module frame within {timeout} s; receiver stats {stats}") from None
        frame = ModuleFrame.unpack(meta)
        if self.ring.committed - seq <= self.ring.n_slots:  # its log entry is not reused yet
            assert self.ring.logged_ids(seq, seq + 1).tolist() == [frame.id]
        return frame

    def slot(self, image_id: int) -> bytes:
        """The bytes of ``image_id``'s slot in the frame ring."""
        return self.ring.read(image_id)

    def close(self) -> None:
        """Stop the receiver and close its socket, ring and the sender."""
        self.receiver.stop()
        self.thread.join(30)
        self.sender.close()
        self.ring.close()
        self.receiver.close()


def run_simulator(config: DetectorConfig, rate_hz: float, n_images: int, **faults: Any) -> DetectorSimulator:
    """Send ``n_images`` of the built-in simulator's pattern at ``rate_hz`` (with ``faults``: dropped
    packets, ...) to ``config``'s ports; returns the finished simulator (its counts)."""
    with DetectorSimulator(config, rate_hz=rate_hz, n_images=n_images, **faults) as sim:
        sim.run()
    return sim


def check_images(readout: InProcessReadout, ids: range | list[int], good: bool = True) -> None:
    """Every image of ``ids`` in the readout's image ring is the simulator's pattern pixel for pixel
    (and, with ``good``, complete)."""
    for image_id in ids:
        meta, image = readout.image(image_id)
        assert meta.id == image_id
        if good:
            assert (meta.status, meta.n_missing_packets) == (ImageStatus.GOOD, 0), f"image {image_id}"
        want = expected_image(readout.config, image_id)
        np.testing.assert_array_equal(image, want, err_msg=f"image {image_id}")


def assert_no_leftovers(config: DetectorConfig, ipc_dir: str | os.PathLike[str]) -> None:
    """No ring of ``config``'s detector in ``/dev/shm`` and no file of it in ``ipc_dir``."""
    assert shm_segments(config.detector_name) == []
    leftovers = [p.name for p in Path(ipc_dir).iterdir() if config.detector_name in p.name]
    assert leftovers == []
