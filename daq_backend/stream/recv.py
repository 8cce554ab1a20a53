"""stream-recv: the receiving end of buffer replication (reference §1.1: "std_stream_recv broadcasts
the metadata of received images in the same way as the std_assembler does").

Owns an image ring of the detector's geometry and binds the detector's ``image_metadata_address``
PUB, so on this host a writer agent (or any reader) cannot tell it from the assembler. Received
bytes go straight into the ring slot (``recv_into``); the slot is committed, with the producer's
slot metadata verbatim, and the 56-byte ``ImageMetadata`` republished only once the sender's
``VERDICT`` says the bytes were intact (``wire``).

Loss accounting: the sender numbers every image it took from the producer. Everything up to a
verdict's sequence number that did not arrive is ``lost`` - images dropped at the sender's HWM,
during an outage of this process, or in a dead connection. The position (sender epoch, settled
sequence number) and the counters live in a small ``/dev/shm`` segment, so after a crash
(``kill -9``) the restarted receiver counts exactly the images of the outage; a clean stop removes it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import mmap
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig, load_config
from daq_backend.formats import DTYPE_CODES, ImageMetadata
from daq_backend.ram_buffer import MAGIC, RING_HEADER, RingBuffer, shm_path
from daq_backend.stats import StatsReporter, service_name
from daq_backend.stream._common import PeerMonitor, set_liveness
from daq_backend.stream.send import STATUS_MEMORY, payload_nbytes
from daq_backend.stream.wire import Kind, StreamHeader, WireError, unpack_seqs
from daq_backend.supervisor import run_service

log = logging.getLogger(__name__)

_STATE_MAGIC = int.from_bytes(b"SDQRSTA1", "little")
_STATE_BYTES = 4096


class ReceiverBusy(RuntimeError):
    """Another stream-recv already serves this detector on this host."""


class RecvState:
    """Position and counters of a receiver in a ``/dev/shm`` segment (uint64 fields), locked with
    ``flock`` by the running receiver; any process may read it (``read_recv_state``)."""

    POSITION = ("epoch", "settled_upto", "pid")
    COUNTERS = (
        "received",  # images whose bytes arrived
        "published",  # committed to the ring and republished (= images on this host)
        "bytes",
        "lost",  # never arrived: dropped at the sender, sent during our outage, dead connection
        "lapped",  # the sender found the slot overwritten before sending (sender too slow)
        "torn",  # slot overwritten at the sender while in transmission: discarded, never published
        "rejected",  # did not fit this receiver's detector config
        "overrun",  # our own ring slot was needed again before the image was verified
        "bad_messages",
        "reconnects",
        "restarts",  # crash recoveries of this receiver
        "sender_restarts",
    )
    FIELDS = ("magic",) + POSITION + COUNTERS
    _INDEX = {name: i for i, name in enumerate(FIELDS)}

    def __init__(self, name: str) -> None:
        self.name = name
        path = shm_path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o660)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = (read_state_file(name) or {}).get("pid", "?")
            raise ReceiverBusy(f"another stream-recv (pid {pid}) owns /dev/shm/{name}") from None
        if os.fstat(fd).st_size < _STATE_BYTES:
            os.ftruncate(fd, _STATE_BYTES)
        self._fd = fd
        self._mm = mmap.mmap(fd, _STATE_BYTES)
        self.values = np.frombuffer(self._mm, dtype="<u8", count=len(self.FIELDS))
        self.recovered = int(self.values[0]) == _STATE_MAGIC
        if not self.recovered:
            self.values[:] = 0
            self.values[0] = _STATE_MAGIC
        else:
            self.add("restarts")
        self.set("pid", os.getpid())

    def get(self, field: str) -> int:
        return int(self.values[self._INDEX[field]])

    def set(self, field: str, value: int) -> None:
        self.values[self._INDEX[field]] = value

    def add(self, field: str, n: int = 1) -> None:
        self.values[self._INDEX[field]] += n

    def as_dict(self) -> dict[str, int]:
        return {name: int(v) for name, v in zip(self.FIELDS[1:], self.values[1:], strict=True)}

    def close(self, remove: bool) -> None:
        """Unmap; ``remove`` (a clean stop) deletes the segment, a crash leaves it for recovery."""
        del self.values
        self._mm.close()
        if remove:
            shm_path(self.name).unlink(missing_ok=True)
        os.close(self._fd)


def read_state_file(name: str) -> dict[str, int] | None:
    """The counters of a receiver's state segment (running or crashed), or None if there is none."""
    try:
        with open(shm_path(name), "rb") as f:
            raw = f.read(8 * len(RecvState.FIELDS))
    except FileNotFoundError:
        return None
    if len(raw) < 8 * len(RecvState.FIELDS):
        return None
    values = np.frombuffer(raw, dtype="<u8")
    if int(values[0]) != _STATE_MAGIC:
        return None
    return {name: int(v) for name, v in zip(RecvState.FIELDS[1:], values[1:], strict=True)}


def read_recv_state(config: DetectorConfig) -> dict[str, int] | None:
    """Counters of this host's stream-recv for ``config`` (for status pages and tests)."""
    return read_state_file(ipc.stream_recv_state_name(config.detector_name))


def _own_ring(config: DetectorConfig, adopt: bool) -> RingBuffer:
    """Create the image ring; after a crash, take over the crashed receiver's ring instead if it has
    the same geometry, so readers on this host keep the images they were already told about."""
    name = ipc.image_ring_name(config.detector_name)
    if adopt:
        try:
            fd = os.open(shm_path(name), os.O_RDWR)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            head = os.pread(fd, RING_HEADER.size, 0)
            if len(head) == RING_HEADER.size:
                magic, n_slots, slot_nbytes, *_ = RING_HEADER.unpack(head)
                if (magic, n_slots, slot_nbytes) == (MAGIC, config.image_ring_slots, config.image_nbytes):
                    return RingBuffer(name, fd, owner=True)
            os.close(fd)
    return RingBuffer.create(name, config.image_nbytes, config.image_ring_slots)


class StreamReceiver:
    """Receives a replicated image buffer from one stream-send at ``address`` (connects by default;
    ``bind=True`` to let the sender connect). ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        config: DetectorConfig,
        address: str,
        *,
        bind: bool = False,
        rcvhwm: int = 32,
        stats_interval: float = 1.0,
        heartbeat: float = 1.0,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        self.shape = config.image_shape
        self.dtype_code = DTYPE_CODES[config.image_dtype]
        self.state = RecvState(ipc.stream_recv_state_name(config.detector_name))
        if self.state.recovered:
            log.warning(
                "stream-recv %s: recovered after a crash at sequence %d; images of the outage count as lost",
                config.detector_name, self.state.get("settled_upto"),
            )
        # seq -> (image id, metadata, slot metadata) awaiting the verdict, or the reason it will not be
        # published ("lapped", "rejected", "overrun"); insertion order is sequence order.
        self._pending: dict[int, tuple[int, bytes, bytes] | str] = {}
        self._slot_owner: dict[int, int] = {}  # ring slot -> pending seq written into it
        self.sender_status: dict[str, Any] = {}
        self._last_loss = -1e9
        self._last_torn = -1e9
        self._last_reject = -1e9
        self._reject_reason = ""
        self._status = ""
        self._reconnects_before = self.state.get("reconnects")  # of earlier lives of this receiver
        self._stop = threading.Event()
        self._closed = False

        self._ctx = context or zmq.Context.instance()
        self.ring = _own_ring(config, adopt=self.state.recovered)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, max(config.image_ring_slots, 1000))
        self._pub.setsockopt(zmq.LINGER, 500)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, rcvhwm)
        self._pull.setsockopt(zmq.LINGER, 0)
        set_liveness(self._pull, int(heartbeat * 1000))
        self._monitor = PeerMonitor(self._pull)
        try:
            self._pub.bind(ipc.image_metadata_address(config.detector_name))
            if bind:
                self._pull.bind(address)
            else:
                self._pull.connect(address)
        except zmq.ZMQError as exc:
            self._close_sockets()
            self.ring.close()
            self.state.close(remove=not self.state.recovered)
            verb = "bind" if bind else "connect to"
            raise ValueError(f"stream-recv: cannot {verb} {address!r}: {exc}") from None
        self.address = self._pull.getsockopt_string(zmq.LAST_ENDPOINT) if bind else address
        self._reporter = StatsReporter(
            config.detector_name, service_name("stream-recv"), self.snapshot,
            interval=stats_interval, context=self._ctx,
        )

    # -- status ------------------------------------------------------------------------------
    def status(self) -> str:
        now, st = time.monotonic(), self.state
        if now - self._last_reject < STATUS_MEMORY:
            return f"error: {self._reject_reason}"
        if self._monitor.peers == 0:
            return "sender disconnected" if self._monitor.connections else "waiting for sender"
        if now - self._last_loss < STATUS_MEMORY:
            return f"losing images: {st.get('lost')} lost so far"
        if now - self._last_torn < STATUS_MEMORY:
            return f"link too slow: {st.get('torn')} images overwritten at the sender during transmission"
        return "ok" if st.get("received") else "connected, waiting for images"

    def counters(self) -> dict[str, Any]:
        data: dict[str, Any] = self.state.as_dict()
        data["peers"] = self._monitor.peers
        data["pending"] = len(self._pending)
        data["status"] = self.status()
        data["sender_status"] = str(self.sender_status.get("status", ""))  # from its last heartbeat
        return data

    def snapshot(self) -> dict[str, Any]:
        data = self.counters()
        data["images"] = data["published"]
        return data

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._monitor.socket, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(100))
            if self._monitor.socket in events and self._monitor.drain():
                self.state.set("reconnects", self._reconnects_before + self._monitor.reconnects)
            if self._pull in events:
                for _ in range(64):
                    try:
                        self._receive_one()
                    except zmq.Again:
                        break
            self._watch_status()
            self._reporter.tick()

    def _receive_one(self) -> None:
        raw = self._pull.recv(zmq.NOBLOCK)
        try:
            header = StreamHeader.unpack(raw)
            self._adopt_epoch(header)
            if header.kind is Kind.IMAGE:
                self._on_image(header)
            elif header.kind is Kind.LAPPED:
                self._on_lapped(header)
            else:
                self._on_verdict(header)
        except WireError as exc:
            self.state.add("bad_messages")
            log.error("stream-recv: ignoring a message: %s", exc)
        self._discard_rest()

    def _next_part(self, what: str) -> bytes:
        if not self._pull.getsockopt(zmq.RCVMORE):
            raise WireError(f"message ends before its {what}")
        return self._pull.recv()

    def _discard_rest(self) -> None:
        while self._pull.getsockopt(zmq.RCVMORE):
            self._pull.recv_into(bytearray())

    def _adopt_epoch(self, header: StreamHeader) -> None:
        st = self.state
        if header.epoch == st.get("epoch"):
            return
        if st.get("epoch"):
            st.add("sender_restarts")
            unverified = sum(1 for entry in self._pending.values() if isinstance(entry, tuple))
            st.add("lost", unverified)
            log.warning("stream-recv: sender restarted; %d unverified images discarded", unverified)
        self._pending.clear()
        self._slot_owner.clear()
        st.set("epoch", header.epoch)
        st.set("settled_upto", header.seq if header.kind is Kind.VERDICT else header.seq - 1)

    def _on_image(self, header: StreamHeader) -> None:
        st, seq = self.state, header.seq
        meta_raw = self._next_part("metadata")
        slot_meta = self._next_part("slot metadata")
        if not self._pull.getsockopt(zmq.RCVMORE):
            raise WireError(f"image message {seq} has no image bytes")
        if seq <= st.get("settled_upto") or seq in self._pending:
            raise WireError(f"image message {seq} repeats a sequence number already seen")
        try:
            meta = ImageMetadata.unpack(meta_raw)
            nbytes = self._check_geometry(meta)
        except ValueError as exc:
            self._reject(seq, str(exc))
            return
        slot = self.ring.slot_index(meta.id)
        previous = self._slot_owner.get(slot)
        if previous is not None and isinstance(self._pending.get(previous), tuple):
            self._pending[previous] = "overrun"  # its bytes are about to be overwritten
        received = self._pull.recv_into(self.ring.begin_write(meta.id))
        self._slot_owner[slot] = seq
        if received != nbytes:
            self._reject(seq, f"image {meta.id}: {received} bytes received, its metadata says {nbytes}")
            return
        st.add("received")
        st.add("bytes", received)
        self._pending[seq] = (meta.id, meta_raw, slot_meta)

    def _check_geometry(self, meta: ImageMetadata) -> int:
        if meta.shape != self.shape or meta.dtype != self.dtype_code:
            raise ValueError(
                f"image {meta.id} is {meta.height}x{meta.width} {meta.numpy_dtype} but this receiver's "
                f"{self.config.detector_name} config says {self.shape[0]}x{self.shape[1]} "
                f"{self.config.image_dtype}: sender and receiver configs differ"
            )
        return payload_nbytes(meta, self.ring.slot_nbytes)

    def _reject(self, seq: int, reason: str) -> None:
        self.state.add("rejected")
        self._pending[seq] = "rejected"
        if reason != self._reject_reason:
            log.error("stream-recv: rejecting images: %s", reason)
        self._reject_reason = reason
        self._last_reject = time.monotonic()

    def _on_lapped(self, header: StreamHeader) -> None:
        self._next_part("metadata")
        if header.seq > self.state.get("settled_upto"):
            self._pending[header.seq] = "lapped"

    def _on_verdict(self, header: StreamHeader) -> None:
        torn = set(unpack_seqs(self._next_part("torn list")))
        status = self._next_part("status")
        if status:
            try:
                self.sender_status = json.loads(status)
            except ValueError:
                self.state.add("bad_messages")
        self._settle(header.seq, torn)

    def _settle(self, upto: int, torn: set[int]) -> None:
        """Decide every image up to ``upto``: publish the intact ones, count everything else."""
        st, pending = self.state, self._pending
        settled = st.get("settled_upto")
        if upto <= settled:
            return
        accounted = 0
        while pending:
            seq = next(iter(pending))
            if seq > upto:
                break
            entry = pending.pop(seq)
            accounted += 1
            if isinstance(entry, str):
                if entry != "rejected":  # counted when it arrived
                    st.add(entry)
            elif seq in torn:
                st.add("torn")
                self._last_torn = time.monotonic()
            else:
                image_id, meta_raw, slot_meta = entry
                self.ring.commit(image_id, slot_meta)
                self._pub.send(meta_raw)
                st.add("published")
            if isinstance(entry, tuple) and self._slot_owner.get(self.ring.slot_index(entry[0])) == seq:
                del self._slot_owner[self.ring.slot_index(entry[0])]
            st.set("settled_upto", seq)
        lost = upto - settled - accounted
        if lost:
            st.add("lost", lost)
            self._last_loss = time.monotonic()
        st.set("settled_upto", upto)

    def _watch_status(self) -> None:
        status = self.status()
        condition = status.split(":")[0]  # the condition, not its running count
        if condition != self._status:
            level = logging.INFO if status.startswith(("ok", "connected", "waiting")) else logging.WARNING
            log.log(level, "stream-recv %s -> %s", self.config.detector_name, status)
            self._status = condition

    # -- lifetime ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="stream-recv", daemon=True)
        thread.start()
        return thread

    def _close_sockets(self) -> None:
        self._pull.disable_monitor()
        self._monitor.close()
        self._pull.close()
        self._pub.close()

    def close(self) -> None:
        """Close sockets, unlink the ring (we own it) and remove the state (a clean stop)."""
        if self._closed:
            return
        self._closed = True
        self._reporter.close()
        self._close_sockets()
        self.ring.close()
        self.state.close(remove=True)

    def __enter__(self) -> StreamReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """std-daq stream-recv CONFIG --address tcp://HOST:PORT: receive a replicated image buffer."""
    parser = argparse.ArgumentParser(prog="std-daq stream-recv", description=main.__doc__)
    parser.add_argument("config", help="detector JSON file (same geometry as on the sending host)")
    parser.add_argument("--address", required=True, help="tcp:// address of stream-send (see --bind)")
    parser.add_argument("--bind", action="store_true", help="bind --address and let the sender connect")
    parser.add_argument("--hwm", type=int, default=32, help="receive high-water mark in images")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        receiver = StreamReceiver(load_config(args.config), args.address, bind=args.bind, rcvhwm=args.hwm)
    except ReceiverBusy as exc:
        log.error("%s", exc)
        return 1
    log.info("stream-recv %s from %s", receiver.config.detector_name, receiver.address)
    return run_service(receiver)


if __name__ == "__main__":
    sys.exit(main())
