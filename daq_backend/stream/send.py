"""stream-send: replicate a detector's image buffer to another server (reference §1.1, §1.2).

SUBscribes to the producer's 56-byte ``ImageMetadata`` stream, and for every image sends
[stream header, metadata, slot metadata, image bytes] to one stream-recv over ZMQ TCP (format in
``wire``). The image bytes leave zero-copy from the ring slot, which the producer may overwrite while
they are still queued: the sender tracks each message until libzmq has handed it to the kernel, then
checks the slot's seqlock, and tells the receiver in a ``VERDICT`` which images are intact - the
receiver publishes nothing before that, so a slow link is reported, never silently corrupted.

Why PUSH/PULL and not the seed's PUB/SUB: PUB drops silently at its high-water mark, so the sender
could neither count nor report a slow receiver. PUSH with ``NOBLOCK`` returns EAGAIN at the HWM (or
when no receiver is connected), which we count as ``dropped_by_hwm`` / ``dropped_no_receiver``.
The price: PUSH load-balances, so run one stream-send per replica (``peers`` > 1 is reported as an
error: the stream would be split between the receivers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig, load_config
from daq_backend.formats import Encoding, ImageMetadata
from daq_backend.ram_buffer import SLOT_META_BYTES, AttachedRing, SlotOverwritten
from daq_backend.stats import Counters, StatsReporter, service_name
from daq_backend.stream._common import PeerMonitor, set_liveness
from daq_backend.stream.wire import Kind, StreamHeader, pack_seqs
from daq_backend.supervisor import run_service

log = logging.getLogger(__name__)

#: How long a condition (a drop, a lapped slot) keeps colouring the status.
STATUS_MEMORY = 2.0


@dataclass
class SenderStats(Counters):
    images: int = 0  # ImageMetadata taken from the producer = sequence numbers issued
    sent: int = 0  # handed to ZMQ
    bytes: int = 0
    verified: int = 0  # sent, and the slot was intact once the bytes were out
    torn: int = 0  # sent, but the slot was overwritten during transmission (receiver discards it)
    lapped: int = 0  # slot overwritten before we could send it (this sender is too slow)
    dropped_by_hwm: int = 0  # receiver connected but its queue is full (receiver or link too slow)
    dropped_no_receiver: int = 0
    bad_messages: int = 0
    ring_reattached: int = 0
    peers: int = 0
    reconnects: int = 0
    inflight: int = 0
    last_seq: int = 0
    last_image_id: int = 0


def payload_nbytes(meta: ImageMetadata, slot_nbytes: int) -> int:
    """Bytes of the image in its slot: exact for raw images; the whole slot for encoded ones, whose
    compressed size the 56-byte metadata does not carry."""
    if meta.encoding != Encoding.RAW:
        return slot_nbytes
    nbytes = meta.height * meta.width * meta.numpy_dtype.itemsize
    if nbytes > slot_nbytes:
        raise ValueError(
            f"image {meta.id} is {meta.height}x{meta.width} {meta.numpy_dtype} ({nbytes} bytes) but the "
            f"ring slot holds {slot_nbytes} bytes"
        )
    return nbytes


class StreamSender:
    """Replicates the image ring of ``config`` to one receiver at ``address``.

    ``bind=True`` (default) binds ``address`` (e.g. ``tcp://*:9100``) and the receiver connects;
    ``bind=False`` connects to a receiver that binds. ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        config: DetectorConfig,
        address: str,
        *,
        bind: bool = True,
        sndhwm: int | None = None,
        ring_timeout: float = 10.0,
        stats_interval: float = 1.0,
        heartbeat: float = 1.0,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        self.stats = SenderStats()
        self.epoch = int.from_bytes(os.urandom(8), "little") or 1
        # Queued images point into ring slots: keep the queue well below the ring so a queued image is
        # normally sent before the producer laps it (a lapped one is still caught by the verdict).
        # Counted in images by us, not in messages by ZMQ, so verdicts never crowd out images.
        self.sndhwm = sndhwm if sndhwm is not None else max(2, min(1000, config.image_ring_slots // 2))
        if self.sndhwm < 1:
            raise ValueError(f"stream-send: sndhwm must be >= 1 image, got {self.sndhwm}")
        self._queued = 0  # images whose bytes ZMQ still holds
        self._verdict_batch = max(1, self.sndhwm // 4)
        self._last_verdict = 0.0
        self._ring = AttachedRing(ipc.image_ring_name(config.detector_name))
        self._ring_timeout = ring_timeout
        self._heartbeat = heartbeat
        self._seq = 0
        self._unresolved: deque[tuple[int, int, zmq.MessageTracker | None]] = deque()
        self._resolved_upto = 0
        self._verdict_upto = 0
        self._torn_unreported: list[int] = []
        self._next_heartbeat = 0.0
        self._last = {"hwm": -1e9, "lapped": -1e9, "torn": -1e9}
        self._status = ""
        self._stop = threading.Event()
        self._closed = False

        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, max(config.image_ring_slots, 50_000))
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(ipc.image_metadata_address(config.detector_name))
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 2 * self.sndhwm + 64)  # a backstop; the image budget rules
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a receiver that is not there
        set_liveness(self._push, int(heartbeat * 1000))
        self._monitor = PeerMonitor(self._push)
        try:
            if bind:
                self._push.bind(address)
            else:
                self._push.connect(address)
        except zmq.ZMQError as exc:
            self._close_sockets()
            verb = "bind" if bind else "connect to"
            raise ValueError(f"stream-send: cannot {verb} {address!r}: {exc}") from None
        self.address = self._push.getsockopt_string(zmq.LAST_ENDPOINT) if bind else address
        self._reporter = StatsReporter(
            config.detector_name, service_name("stream-send"), self.snapshot,
            interval=stats_interval, context=self._ctx,
        )

    # -- status ------------------------------------------------------------------------------
    def status(self) -> str:
        st, now = self.stats, time.monotonic()
        if st.peers > 1:
            return f"error: {st.peers} receivers connected, PUSH splits the stream between them"
        if st.peers == 0:
            return "no receiver connected" + (
                f" ({st.dropped_no_receiver} images dropped)" if st.dropped_no_receiver else ""
            )
        if now - self._last["hwm"] < STATUS_MEMORY:
            return f"receiver slow: {st.dropped_by_hwm} images dropped at the send high-water mark"
        if now - self._last["torn"] < STATUS_MEMORY:
            return f"receiver slow: {st.torn} images overwritten in the ring while being sent"
        if now - self._last["lapped"] < STATUS_MEMORY:
            return f"sender slow: {st.lapped} images overwritten in the ring before they could be sent"
        return "ok" if st.images else "waiting for images"

    def snapshot(self) -> dict[str, Any]:
        self.stats.inflight = len(self._unresolved)
        return {**self.stats.snapshot(), "status": self.status()}

    def counters(self) -> dict[str, Any]:
        return self.snapshot()

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._monitor.socket, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(1 if self._unresolved else 100))
            if self._monitor.socket in events:
                self._on_peer_event()
            if self._sub in events:
                for _ in range(256):  # bounded so verdicts and stats get their turn
                    try:
                        raw = self._sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_metadata(raw)
                    self._reap()
            self._reap()
            self._send_verdict()
            self._watch_status()
            self._reporter.tick()
        self._flush()

    def _on_peer_event(self) -> None:
        if self._monitor.drain():
            self.stats.peers = self._monitor.peers
            self.stats.reconnects = self._monitor.reconnects
            self._next_heartbeat = 0.0  # tell a new receiver where we stand right away

    def _on_metadata(self, raw: bytes) -> None:
        st = self.stats
        try:
            meta = ImageMetadata.unpack(raw)
        except ValueError as exc:
            st.bad_messages += 1
            log.error("ignoring a bad ImageMetadata message: %s", exc)
            return
        ring = self._ring.get(timeout=self._ring_timeout)
        if ring is None:
            st.bad_messages += 1
            log.error("image %d announced but ring %s does not exist", meta.id, self._ring.name)
            return
        try:
            nbytes = payload_nbytes(meta, ring.slot_nbytes)
        except ValueError as exc:
            st.bad_messages += 1
            log.error("ignoring image: %s", exc)
            return
        self._seq += 1
        seq = self._seq
        st.images += 1
        st.last_seq = seq
        st.last_image_id = meta.id
        try:
            view, slot_meta = self._read_slot(meta.id)
        except SlotOverwritten:
            st.lapped += 1
            self._last["lapped"] = time.monotonic()
            try:
                self._push.send_multipart([StreamHeader(Kind.LAPPED, self.epoch, seq, meta.id).pack(), raw],
                                          zmq.NOBLOCK)
            except zmq.Again:
                pass  # the receiver counts it as lost; our lapped counter says why
            self._unresolved.append((seq, meta.id, None))
            return
        if self._queued >= self.sndhwm:
            self._reap()
        try:
            if self._queued >= self.sndhwm:
                raise zmq.Again()
            header = StreamHeader(Kind.IMAGE, self.epoch, seq, meta.id).pack()
            self._push.send(header, zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.Again:
            if self._monitor.peers:
                st.dropped_by_hwm += 1
                self._last["hwm"] = time.monotonic()
            else:
                st.dropped_no_receiver += 1
            self._unresolved.append((seq, meta.id, None))
            return
        # The first part was accepted, so ZMQ takes the rest of the message atomically.
        self._push.send(raw, zmq.SNDMORE)
        self._push.send(slot_meta, zmq.SNDMORE)
        tracker = self._push.send(view[:nbytes], copy=False, track=True)
        st.sent += 1
        st.bytes += nbytes
        self._queued += 1
        self._unresolved.append((seq, meta.id, tracker))

    def _read_slot(self, image_id: int) -> tuple[np.ndarray, bytes]:
        ring = self._ring.ring
        try:
            if ring is not None:
                return ring.view(image_id), ring.meta(image_id, SLOT_META_BYTES)
        except SlotOverwritten:
            pass
        if not self._ring.refreshed():
            raise SlotOverwritten(f"ring {self._ring.name} no longer holds image {image_id}")
        self.stats.ring_reattached += 1
        log.info("producer re-created ring %s: re-attached", self._ring.name)
        ring = self._ring.ring
        assert ring is not None
        return ring.view(image_id), ring.meta(image_id, SLOT_META_BYTES)

    def _reap(self) -> None:
        """Resolve the longest prefix of images whose bytes ZMQ has released: intact or torn."""
        queue, st = self._unresolved, self.stats
        while queue:
            seq, image_id, tracker = queue[0]
            if tracker is not None:
                if not tracker.done:
                    break
                self._queued -= 1
                ring = self._ring.ring
                try:
                    if ring is None:
                        raise SlotOverwritten("ring detached")
                    ring.check(image_id)
                    st.verified += 1
                except SlotOverwritten:
                    st.torn += 1
                    self._last["torn"] = time.monotonic()
                    self._torn_unreported.append(seq)
            queue.popleft()
            self._resolved_upto = seq

    def _send_verdict(self, force: bool = False) -> None:
        now = time.monotonic()
        heartbeat = force or now >= self._next_heartbeat
        news = self._resolved_upto - self._verdict_upto
        # One verdict per batch of images at high rates, at once when the queue is empty or it is 2 ms old.
        due = news and (not self._queued or news >= self._verdict_batch or now - self._last_verdict > 0.002)
        if not (due or heartbeat or self._torn_unreported):
            return
        status = json.dumps(self.snapshot()).encode() if heartbeat else b""
        parts = [
            StreamHeader(Kind.VERDICT, self.epoch, self._resolved_upto).pack(),
            pack_seqs(self._torn_unreported),
            status,
        ]
        try:
            self._push.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            return  # verdicts are cumulative: the next one covers this
        self._verdict_upto = self._resolved_upto
        self._torn_unreported = []
        self._last_verdict = now
        if heartbeat:
            self._next_heartbeat = now + self._heartbeat

    def _watch_status(self) -> None:
        status = self.status().split(" (")[0].split(":")[0]  # the condition, not its running count
        if status != self._status:
            level = logging.INFO if status in ("ok", "waiting for images") else logging.WARNING
            log.log(level, "stream-send %s -> %s", self.config.detector_name, self.status())
            self._status = status

    def _flush(self, timeout: float = 2.0) -> None:
        """On stop: let queued images go out and send the final verdict, so the receiver can settle
        (publish or discard) everything we sent."""
        deadline = time.monotonic() + timeout
        while self._unresolved and time.monotonic() < deadline:
            self._on_peer_event()
            self._reap()
            time.sleep(0.001)
        self._reap()
        while time.monotonic() < deadline and self.stats.peers:
            try:
                self._push.send_multipart(
                    [StreamHeader(Kind.VERDICT, self.epoch, self._resolved_upto).pack(),
                     pack_seqs(self._torn_unreported), json.dumps(self.snapshot()).encode()],
                    zmq.NOBLOCK,
                )
                self._verdict_upto = self._resolved_upto
                break
            except zmq.Again:
                time.sleep(0.01)

    # -- lifetime ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="stream-send", daemon=True)
        thread.start()
        return thread

    def _close_sockets(self) -> None:
        self._push.disable_monitor()
        self._monitor.close()
        self._sub.close()
        self._push.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reporter.close()
        self._push.setsockopt(zmq.LINGER, 500)  # the final verdict
        self._close_sockets()
        self._ring.close()

    def __enter__(self) -> StreamSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """std-daq stream-send CONFIG --address tcp://*:PORT: replicate the image buffer to stream-recv."""
    parser = argparse.ArgumentParser(prog="std-daq stream-send", description=main.__doc__)
    parser.add_argument("config", help="detector JSON file")
    parser.add_argument("--address", required=True, help="tcp:// address to bind (or connect, see --connect)")
    parser.add_argument("--connect", action="store_true", help="connect to a receiver that binds")
    parser.add_argument("--hwm", type=int, default=None, help="send high-water mark in images")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sender = StreamSender(load_config(args.config), args.address, bind=not args.connect, sndhwm=args.hwm)
    log.info("stream-send %s on %s (epoch %x)", sender.config.detector_name, sender.address, sender.epoch)
    return run_service(sender)


if __name__ == "__main__":
    sys.exit(main())
