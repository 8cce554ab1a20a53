"""UDP receiver of one detector module: packets -> module frames in the module's frame ring.

One receiver per module (one OS process each in production). Datagrams are received in batches,
one ``recvmmsg`` call each (:mod:`daq_backend.readout.mmsg`), into a preallocated staging buffer,
and their payloads copied into the ring slot of their frame (``slot = image_id % n_slots``); no
per-packet buffers are allocated. Two ways to place them, with the same rules and counters:

* the fast path (SLS detectors: Jungfrau, Eiger): a run of clean datagrams of one frame is checked
  and copied with a dozen numpy operations for the whole run, headers read through a structured
  view of the staging buffer;
* one at a time (``_place_each``): whatever the fast path declines (bad datagrams, duplicates, late
  packets, short runs), GigaFRoST, and everything where ``recvmmsg`` is missing (then received with
  one ``recv_into`` each).

(Scattering header and payload straight into the predicted slot position with ``recvmsg_into`` was
measured: 2.4 us/packet against 2.0 for ``recv_into`` + an 8 KiB copy, because of the tuples it
returns.)

A frame is flushed (slot committed with its ``ModuleFrame`` as slot metadata: the assembler follows the
ring's commit log, no message per frame) when it is complete,
when the first packet of another frame arrives (it lost packets), or after ``idle_flush`` seconds
without packets of its stream (so the last frame of an acquisition is not held back by a lost last
packet, however much else arrives). Before flushing an incomplete frame the byte ranges of its
missing packets are zeroed: a reader never sees pixels of an older frame (reference weakness 8).

Only packets of the module's stream reach the ring (``readout.window``): a header of another detector
type or version is a bad datagram; numbers no detector sends (``layout.numbers_in_range``) are rejected;
a header module id other than the stream's (pinned by ``header_module_ids`` or learned from the
first stream) is rejected; a numbering outside the stream's window is staged in private buffers and
placed only once it is confirmed as a new numbering. So a stray, spoofed or absurd packet never
opens a frame, never becomes an image and never writes a pixel; it is counted by reason
(``rejected_module_id``, ``rejected_out_of_range``, ``rejected_out_of_window``) and a port that takes
none of what it receives says so in the log. Nothing a sender does makes it crash: bad datagrams,
duplicates, reordered and late packets are counted and dropped or placed.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig, DetectorType, load_config
from daq_backend.detectors import layout_for
from daq_backend.detectors.base import PacketInfo
from daq_backend.detectors.jungfrau import JungfrauLayout
from daq_backend.detectors.sls import SLS_HEADER_VERSION, SlsLayout
from daq_backend.formats import MAX_RECEIVED_MAP_PACKETS, ModuleFrame, pack_received
from daq_backend.priority import apply_rt_priority
from daq_backend.ram_buffer import RingBuffer
from daq_backend.readout import mmsg
from daq_backend.readout.direct import ImageRingTarget, direct_possible, with_direct_flag
from daq_backend.readout.window import MAX_FRAME_GAP, CandidateFrame, StreamWindow
from daq_backend.stats import Counters, StatsReporter, service_name

log = logging.getLogger(__name__)

#: Linux' SO_RCVBUFFORCE (CAP_NET_ADMIN may exceed net.core.rmem_max); missing from ``socket``.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
#: Frames the socket buffer should absorb while the process is descheduled (the seed: 100 frames).
BUFFERED_FRAMES = 100
MAX_DEFAULT_RCVBUF = 512 * 1024 * 1024
#: How many recently flushed ids a receiver remembers to recognise late or duplicate packets.
RECENT_FRAMES = 16
#: Longest sleep of an idle receiver (the stats reporter's pace): datagrams and ``stop()`` wake it.
IDLE_WAIT = 1.0
#: Largest image id a ring slot can hold (its seqlock stores id + 1 in 64 bits).
MAX_IMAGE_ID = 2**64 - 2
#: Datagrams one ``recvmmsg`` call may return (rows of the staging buffer).
DEFAULT_RECV_BATCH = 128
#: Seconds to wait for more datagrams before a batch is read (see ``default_coalesce``).
COALESCE = 0.00025
#: Frames the socket buffer must hold for the receiver to wait (see ``default_coalesce``).
COALESCE_MIN_FRAMES = 3
#: Shortest run of clean consecutive packets of one frame placed with numpy: a run costs a dozen
#: numpy calls, so a few packets are cheaper one by one.
MIN_FAST_RUN = 8
#: Seconds between two log lines about rejected packets (a port flooded with them logs this often).
REJECTION_LOG_INTERVAL = 10.0


@dataclass
class ReceiverStats(Counters):
    """Everything a receiver saw; ``packets`` counts every datagram, good or bad.

    ``frames_skipped``: gaps in the detector's frame counter (frames of which not a single packet
    arrived; nobody else can notice them on a one-module detector). Rejected packets, by reason:
    ``rejected_module_id`` (another header module id than the stream's), ``rejected_out_of_range``
    (a frame number or pulse id no detector sends), ``rejected_out_of_window`` (a numbering that never
    formed a stream); ``bad_datagrams`` are not packets of this detector at all.
    ``numbering_restarts``: new numberings adopted (a restarted frame counter, a jump beyond the
    window); ``frames_direct``: frames written straight into the image ring (``readout.direct``);
    ``stream_module_id``: the header module id the stream comes from (-1: none yet)."""

    packets: int = 0
    bytes: int = 0
    frames: int = 0
    frames_incomplete: int = 0
    missing_packets: int = 0
    bad_datagrams: int = 0
    duplicate_packets: int = 0
    out_of_order_packets: int = 0
    late_packets: int = 0
    frames_skipped: int = 0
    rejected_module_id: int = 0
    rejected_out_of_range: int = 0
    rejected_out_of_window: int = 0
    numbering_restarts: int = 0
    frames_direct: int = 0
    stream_module_id: int = -1
    last_frame_id: int = 0


def set_receive_buffer(sock: socket.socket, requested: int) -> int:
    """Ask for ``requested`` bytes of socket receive buffer; returns what the kernel granted.

    ``SO_RCVBUFFORCE`` (root / CAP_NET_ADMIN) ignores ``net.core.rmem_max``; otherwise ``SO_RCVBUF``
    is capped by it. Linux reports twice the usable size (bookkeeping), hence the halving."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, requested)
    except (OSError, PermissionError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, requested)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


def default_receive_buffer(max_datagram: int, packets_per_frame: int) -> int:
    return min(BUFFERED_FRAMES * packets_per_frame * max_datagram, MAX_DEFAULT_RCVBUF)


def default_coalesce(rcvbuf: int, frame_nbytes: int) -> float:
    """Seconds to let datagrams queue up after a wake-up before reading them in one batch.

    Without it a receiver faster than the packets arrive wakes for every one or two of them and
    pays a wake-up and system calls per packet (measured at 1.1 kHz: batches of 1-3, no gain over
    ``recv_into``). Waiting needs room: a module sends each frame as one burst (the simulator over
    loopback even faster than a 10 GbE link), so the receiver only waits when the socket buffer
    holds a few frames (``rcvbuf`` as granted, about what it holds of datagrams; the default asks
    for 100 frames, a 4 MiB ``rmem_max`` gives 4); a smaller one is drained as fast as possible.
    Measured with 4 MiB: fewer frames lost than without waiting, at up to ~2.4 kHz. A receiver
    that falls behind finds full batches and never waits.

    ``frame_nbytes``: the datagram bytes of one frame."""
    return COALESCE if rcvbuf >= COALESCE_MIN_FRAMES * frame_nbytes else 0.0


class ModuleReceiver:
    """Receives one module's UDP stream into its frame ring (this object owns the ring).

    CPU per packet, Jungfrau 1 MiB frames over loopback at 1.1 kHz and at full speed (~2.2 kHz),
    ``benchmarks/bench_receiver_cpu.py`` on a shared 2-core VM: 3.1-3.8 us (2.1-2.5 us user) with
    one ``recv_into`` and header parse per datagram (``recv_batch=0``, the path before batching);
    1.4-1.9 us (0.3-1.0 us user) with ``recvmmsg`` batches of 128 and the numpy fast path. What
    remains is mostly the kernel's copy (~1 us, the same on both paths) and the copy into the ring.
    With a socket buffer too small to let datagrams queue (``default_coalesce``) batches stay small
    and the cost is the per-packet one.

    ``recv_batch``: datagrams per ``recvmmsg`` call (0 or 1: one ``recv_into`` each); ``coalesce``:
    seconds to let datagrams queue up after a wake-up (default: ``default_coalesce``).
    ``run()`` blocks until ``stop()``; tests call it in a thread, ``main()`` in its own process."""

    def __init__(
        self,
        config: DetectorConfig,
        module_id: int,
        *,
        idle_flush: float | None = None,
        rcvbuf: int | None = None,
        late_window: float = 0.5,
        stats_interval: float = 1.0,
        recv_batch: int = DEFAULT_RECV_BATCH,
        coalesce: float | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        if not 0 <= module_id < config.n_modules:
            raise ValueError(f"module_id: {module_id} is outside 0..{config.n_modules - 1}")
        self.config = config
        self.module_id = module_id
        self.layout = layout = layout_for(config)
        self.packets_per_frame = ppf = layout.packets_per_frame
        self.header_size = layout.header_size
        #: Flush an open frame after this many idle seconds; well below the synchroniser's timeout
        #: so a frame that lost its last packet reaches the synchroniser before it gives up on it.
        self.idle_flush = config.module_sync_timeout / 4 if idle_flush is None else idle_flush
        self.late_window = late_window
        self.stats = ReceiverStats()
        #: the numbering this receiver takes, and the candidate frames of another one (``window``)
        self.window = StreamWindow(ppf, module_id=config.header_module_id(module_id))
        if self.window.module_id is not None:
            self.stats.stream_module_id = self.window.module_id
        #: Jungfrau with ``image_id_source: auto``: a stream's ids are either pulse ids or frame numbers
        self._auto_pulse = isinstance(layout, JungfrauLayout) and config.image_id_source.value == "auto"
        #: staging buffers of candidate frames, one (frame bytes, packet flags) per window slot, made
        #: on first use (a receiver that never sees a stray packet stages only its first frame)
        self._staging: list[_Staged | None] = [None] * self.window.n_slots
        #: packets placed in the stream's frames (the idle flush and the rejection log watch it)
        self.n_stream_packets = 0
        self._seen_stream_packets = 0
        self._stream_touched = time.monotonic()
        self._next_rejection_log = time.monotonic() + REJECTION_LOG_INTERVAL
        self._logged_counts = (0, 0, 0, 0)
        self._foreign_ids: dict[int, int] = {}
        self._slices = [layout.packet_slice(k) for k in range(ppf)]
        self._sizes = [layout.datagram_size(k) for k in range(ppf)]
        self._uncovered = _uncovered_ranges(self._slices, layout.frame_nbytes)
        self._zeros = bytes(max(nb for _, nb in self._slices + self._uncovered))
        # ModuleFrame.pos_y/pos_x: the module's start corner in the image (informational)
        if config.detector_type is DetectorType.GIGAFROST:
            pos_y = pos_x = 0
        else:  # without positions jungfrau modules are stacked vertically
            stacked = (0, layout.module_shape[0] * module_id, 0, 0)
            x0, y0, _, _ = config.module_positions.get(module_id, stacked)
            pos_y, pos_x = y0, x0
        self._frame_extra = (module_id, config.bit_depth, pos_y, pos_x)

        self._buf = bytearray(layout.max_datagram + 1)  # one spare byte exposes oversized datagrams
        self._mv = memoryview(self._buf)
        # recvmmsg staging (None: one recv_into per datagram) and, for SLS layouts, the numpy views
        # of staged headers and payloads the fast path works on
        self._batch: mmsg.RecvBatch | None = None
        self._rows: list[memoryview] = []
        self._headers: _StagedSlsHeaders | None = None
        if recv_batch > 1 and mmsg.available():
            self._batch = batch = mmsg.RecvBatch(recv_batch, layout.max_datagram + 1)
            self._rows = [row.data for row in batch.buffer]
            if isinstance(layout, SlsLayout):
                self._headers = _StagedSlsHeaders(layout, batch.buffer)
                self._payloads = batch.buffer[:, layout.header_size : layout.max_datagram]
                self._ramp = np.arange(ppf + recv_batch, dtype=np.uint32)  # a run's indices if in order
        elif recv_batch > 1:
            log.info("module %d: no recvmmsg on this platform: one datagram per system call", module_id)
        #: shortest run placed by the numpy fast path (tests lower it to exercise the path)
        self.min_fast_run = MIN_FAST_RUN
        #: packets placed by the numpy fast path (diagnostics; included in ``stats.packets``)
        self.n_fast_packets = 0
        self._stop = threading.Event()
        self._closed = False

        address = (config.udp_host, config.udp_port(module_id))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind(address)
        except OSError as exc:
            self.sock.close()
            raise OSError(
                exc.errno, f"module {module_id}: cannot bind UDP {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
        wanted = rcvbuf or default_receive_buffer(layout.max_datagram, ppf)
        self.rcvbuf = set_receive_buffer(self.sock, wanted)
        log.info("module %d: UDP %s:%d, receive buffer %d bytes granted (%d asked)",
                 module_id, *address, self.rcvbuf, wanted)
        if self.rcvbuf < wanted:
            log.warning(
                "module %d: receive buffer %d < %d bytes: bursts will be lost; run "
                "`sysctl -w net.core.rmem_max=%d` (or start as root)", module_id, self.rcvbuf, wanted, wanted,
            )
        self.sock.setblocking(False)
        #: seconds a wake-up waits before reading a batch, so that the read takes many datagrams
        if coalesce is None:
            coalesce = default_coalesce(self.rcvbuf, ppf * layout.max_datagram)
        self.coalesce = coalesce
        try:
            self.ring = RingBuffer.create(
                ipc.frame_ring_name(config.detector_name, module_id), layout.frame_nbytes,
                config.frame_ring_slots,
            )
        except OSError:
            self.sock.close()
            raise
        #: direct mode (``readout.direct``): where frames go while the image ring is mapped
        self._direct = ImageRingTarget(config, layout.frame_nbytes) if direct_possible(config, layout) \
            else None
        self._cur_direct = False
        #: ``stats.packets`` at the last counter report (an idle receiver wakes to report changes)
        self._reported_packets = -1
        self._ctx = context or zmq.Context.instance()
        #: written by ``stop()`` so that an idle receiver wakes at once (it sleeps up to ``IDLE_WAIT``)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._reporter = StatsReporter(
            config.detector_name, service_name(f"receiver-{module_id}"), self.stats.snapshot,
            interval=stats_interval, context=self._ctx,
        )

        # state of the frame being assembled
        self._cur_id: int | None = None
        self._cur_fn = -1
        self._cur_header: tuple[int, int, int] = (0, 0, 0)
        self._slot: memoryview | None = None
        self._slot_rows: np.ndarray | None = None  # the slot as (packet, payload) for the fast path
        self._received = bytearray(ppf)
        self._received_np = np.frombuffer(self._received, dtype=np.uint8)  # same memory
        self._n_recv = 0
        self._highest = -1
        # the fast path's last (frame number, pulse id) and its image id
        self._run_key: tuple[int, int] | None = None
        self._run_id = -1
        # recently flushed frames: id -> monotonic flush time; the last one's packet bitmap
        self._recent: OrderedDict[int, float] = OrderedDict()
        self._last_received = bytearray(ppf)
        self._last_id: int | None = None
        self._last_frame_index: int | None = None

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Receive until ``stop()``; flushes the open frame on the way out."""
        stopped = self._stop.is_set
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        readable = True
        while not stopped():
            if readable:
                self._receive_available()
                if stopped():
                    break
            # the socket is (most likely) empty: idle flush, candidates, counters, then sleep
            now = time.monotonic()
            self._housekeeping(now)
            readable = bool(poller.poll(self._wait(now) * 1000))
        if self._cur_id is not None:
            self._flush()
        self._count_discarded(self.window.discard_all())

    def _housekeeping(self, now: float) -> None:
        """Between receive rounds: note the stream's activity, flush its open frame once the stream
        has been silent ``idle_flush`` s (other traffic does not hold it back), let waiting
        candidates be adopted or expire, report counters, log rejections."""
        if self.n_stream_packets != self._seen_stream_packets:
            self._seen_stream_packets = self.n_stream_packets
            self._stream_touched = now
            self.window.touch(now)
        if self._cur_id is not None and now - self._stream_touched >= self.idle_flush:
            self._flush()
        if self.window.next_deadline(now) is not None:
            adopt, expired = self.window.check(now)
            self._count_discarded(expired)
            if adopt:
                self._adopt(adopt, now)
        if self._reporter.tick():
            self._reported_packets = self.stats.packets
        if now >= self._next_rejection_log:
            self._log_rejections(now)

    def _wait(self, now: float) -> float:
        """Seconds the idle loop may sleep before ``_housekeeping`` has something to do."""
        wait = IDLE_WAIT
        if self.stats.packets != self._reported_packets:  # report the last changes once due
            wait = min(wait, self._reporter.due_in(now))
        if self._cur_id is not None:
            wait = min(wait, self._stream_touched + self.idle_flush - now)
        deadline = self.window.next_deadline(now)
        if deadline is not None:
            wait = min(wait, deadline - now)
        return max(wait, 0.001)

    def _receive_available(self) -> None:
        """Process datagrams until the socket is (most likely) empty, or ``stop()``."""
        if self._batch is None:
            self._place_each(self._recv_each())
        else:
            self._receive_batches()

    def _recv_each(self) -> Iterator[tuple[memoryview, int]]:
        """Datagrams from one ``recv_into`` each (the path without ``recvmmsg``)."""
        recv_into, buf, mv = self.sock.recv_into, self._buf, self._mv
        stopped = self._stop.is_set
        while not stopped():
            try:
                n = recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. an ICMP error reported on the socket: not fatal
                log.warning("module %d: receive error: %s", self.module_id, exc)
                continue
            yield mv, n

    def _receive_batches(self) -> None:
        """Wait ``coalesce``, then one ``recvmmsg`` per batch until a batch is not full."""
        batch, fd = self._batch, self.sock.fileno()
        assert batch is not None
        stopped = self._stop.is_set
        if self.coalesce > 0:
            time.sleep(self.coalesce)
        while not stopped():
            try:
                n = batch.recv(fd)
            except OSError as exc:  # e.g. an ICMP error reported on the socket: not fatal
                log.warning("module %d: receive error: %s", self.module_id, exc)
                continue
            if n:
                self._place_batch(n)
            if n < batch.vlen:
                return

    def _place_batch(self, n: int) -> None:
        """Place the first ``n`` staged datagrams, in arrival order.

        Runs of at least ``min_fast_run`` clean datagrams of one frame key go through the numpy fast
        path; everything else (and a run the fast path declines) goes through ``_place_each``."""
        headers = self._headers
        if headers is None or n < self.min_fast_run:
            self._place_each(self._staged(0, n))
            return
        assert self._batch is not None
        starts = headers.run_starts(self._batch.lengths, n)
        pending = 0  # first datagram not placed yet
        for start, stop in zip(starts[:-1], starts[1:], strict=True):
            if stop - start < self.min_fast_run:
                continue
            if pending < start:
                self._place_each(self._staged(pending, start))
            pending = stop if self._place_run(start, stop) else start
        if pending < n:
            self._place_each(self._staged(pending, n))

    def _staged(self, start: int, stop: int) -> Iterable[tuple[memoryview, int]]:
        assert self._batch is not None
        return zip(self._rows[start:stop], self._batch.lengths[start:stop].tolist(), strict=True)

    def _place_run(self, start: int, stop: int) -> bool:
        """Place staged datagrams ``start..stop-1`` (clean, one frame key: see ``run_starts``) with a
        few numpy operations; same effect on frame state and counters as ``_place_each``.

        Returns False, having placed nothing, when a packet needs the per-packet rules: a bad or
        out-of-range image id, another module id than the stream's, a frame outside the stream's
        window, a late or duplicate packet, a packet index repeated within the run. Opening the run's
        frame (flushing the previous one) before declining is what ``_place_each`` does first too."""
        size = self.layout.max_datagram
        info = self.layout.parse(self._rows[start][:size])
        if info is None:  # cannot happen after run_starts; the per-packet path counts it
            return False
        key = (info.frame_number, info.pulse_id)
        if key != self._run_key:
            self._run_key, self._run_id = key, self.layout.image_id(info)
        image_id = self._run_id
        if (not 0 <= image_id <= MAX_IMAGE_ID or info.module_id != self.window.module_id
                or not self.layout.numbers_in_range(info.frame_number, info.pulse_id)):
            return False
        if image_id != self._cur_id or info.frame_number != self._cur_fn:
            if image_id == self._cur_id or self._recently_flushed(image_id):
                return False
            pulse_mode = info.pulse_id != 0 if self._auto_pulse else None
            if not self.window.in_window(image_id, info.frame_number, pulse_mode):
                return False
            if self._cur_id is not None:
                self._flush()
            self._open(image_id, info)
        assert self._slot_rows is not None and self._headers is not None
        index = self._headers.packet[start:stop]
        m = stop - start
        first = int(index[0])
        received = self._received_np
        highest = self._highest
        # (np.count_nonzero rather than .any()/.all(): those cost 1 us each in Python wrappers)
        if not np.count_nonzero(index != self._ramp[first : first + m]):
            # the usual run: consecutive packets in order, placed with slices (a fancy-indexed copy
            # costs 3x more)
            if np.count_nonzero(received[first : first + m]):
                return False
            received[first : first + m] = 1
            last = first + m - 1
            # the run holds no received packet, so it lies wholly below or above the highest one
            n_out_of_order = m if last < highest else 0
            self._slot_rows[first : last + 1] = self._payloads[start:stop]
        else:
            index = index.astype(np.intp)
            if np.count_nonzero(received[index]):
                return False
            received[index] = 1
            if np.count_nonzero(received) != self._n_recv + m:  # an index occurs twice in the run
                received[index] = 0
                return False
            # out of order: lower than the highest index placed before it (as ``_place_each`` counts)
            peak = np.maximum.accumulate(index)
            np.maximum(peak, highest, out=peak)
            n_out_of_order = m - int(np.count_nonzero(peak == index))
            last = int(peak[-1])
            self._slot_rows[index] = self._payloads[start:stop]
        self._highest = max(highest, last)
        st = self.stats
        st.out_of_order_packets += n_out_of_order
        st.packets += m
        st.bytes += m * size
        self.n_fast_packets += m
        self.n_stream_packets += m
        self._n_recv += m
        if self._n_recv == self.packets_per_frame:
            self._flush()
        return True

    def _place_each(self, datagrams: Iterable[tuple[memoryview, int]]) -> None:
        """Place datagrams one at a time: every rule for bad, foreign, duplicate, reordered and late
        packets.

        The hot loop of the path without ``recvmmsg``: everything it touches per packet of the open
        frame is a local; the frame state lives in attributes only across ``_new_frame`` (another
        frame, a rejected or staged packet) and ``_flush``. ``layout.image_id`` is called once per
        change of (frame number, pulse id), the fields an image id is made of."""
        parse, image_id_of = self.layout.parse, self.layout.image_id
        in_range = self.layout.numbers_in_range
        sizes, slices = self._sizes, self._slices
        ppf, hs = self.packets_per_frame, self.header_size
        st = self.stats
        key: tuple[int, int] | None = None
        key_id = -1
        key_ok = key_in_range = key_cur = False  # key_cur: the key is the open frame's
        cur_id, slot, received = self._cur_id, self._slot, self._received
        n_recv, highest = self._n_recv, self._highest
        stream_module = self.window.module_id
        n_packets = n_bytes = n_accepted = 0
        try:
            for mv, n in datagrams:
                n_packets += 1
                n_bytes += n
                try:
                    info = parse(mv[:n])
                except Exception:  # a parser must not take the receiver down on garbage
                    info = None
                if info is None:
                    st.bad_datagrams += 1
                    continue
                k = info.packet_index
                if not 0 <= k < ppf or n != sizes[k]:
                    st.bad_datagrams += 1
                    continue
                packet_key = (info.frame_number, info.pulse_id)
                if packet_key != key:
                    key = packet_key
                    key_id = image_id_of(info)
                    key_ok = 0 <= key_id <= MAX_IMAGE_ID
                    key_in_range = in_range(info.frame_number, info.pulse_id)
                    key_cur = key_id == cur_id and info.frame_number == self._cur_fn
                if not key_ok:
                    st.bad_datagrams += 1
                    continue
                if not key_in_range:
                    st.rejected_out_of_range += 1
                    continue
                if not key_cur or info.module_id != stream_module:
                    self._n_recv, self._highest = n_recv, highest
                    opened = self._new_frame(mv, n, info, key_id, k)
                    cur_id, slot, received = self._cur_id, self._slot, self._received
                    n_recv, highest = self._n_recv, self._highest
                    stream_module = self.window.module_id
                    key_cur = key_id == cur_id and info.frame_number == self._cur_fn
                    if not opened:
                        continue
                elif received[k]:
                    st.duplicate_packets += 1
                    continue
                if k < highest:
                    st.out_of_order_packets += 1
                else:
                    highest = k
                off, nb = slices[k]
                slot[off : off + nb] = mv[hs : hs + nb]  # type: ignore[index]
                received[k] = 1
                n_recv += 1
                n_accepted += 1
                if n_recv == ppf:
                    st.packets += n_packets
                    st.bytes += n_bytes
                    n_packets = n_bytes = 0
                    self._n_recv = n_recv
                    self._flush()
                    cur_id = slot = None
                    key_cur = False
        finally:
            st.packets += n_packets
            st.bytes += n_bytes
            self.n_stream_packets += n_accepted
            self._n_recv, self._highest = n_recv, highest

    def _new_frame(self, mv: memoryview, n: int, info: PacketInfo, image_id: int, k: int) -> bool:
        """A packet that is not the open frame's: True when it opened a new frame of the stream (the
        caller places it); False when it was rejected, counted late or staged as a candidate."""
        window = self.window
        module = info.module_id
        if module != window.module_id and window.rejects_module(module, time.monotonic()):
            self.stats.rejected_module_id += 1
            self._note_foreign(module)
            return False
        pulse_mode = info.pulse_id != 0 if self._auto_pulse else None
        if module == window.module_id and image_id != self._cur_id:
            if self._is_late(image_id, k):
                return False
            if window.in_window(image_id, info.frame_number, pulse_mode):
                if self._cur_id is not None:
                    self._flush()
                self._open(image_id, info)
                return True
        self._stage(mv, info, image_id, k, pulse_mode)
        return False

    # -- candidates of a new numbering (see readout.window) -----------------------------------
    def _stage(
        self, mv: memoryview, info: PacketInfo, image_id: int, k: int, pulse_mode: bool | None
    ) -> None:
        """Keep a packet outside the stream's window aside; adopt its numbering once confirmed."""
        now = time.monotonic()
        frame, new, evicted = self.window.stage(image_id, info.frame_number, info.module_id, pulse_mode, now)
        if evicted:
            self._count_discarded(evicted)
        staged = self._staging[frame.slot]
        if staged is None:
            staged = self._staging[frame.slot] = _Staged(self.layout.frame_nbytes, self.packets_per_frame)
        if new:
            staged.clear()
            frame.pulse_id, frame.daq_rec = int(info.pulse_id), int(info.daq_rec)
        if staged.received[k]:
            self.stats.duplicate_packets += 1
            return
        off, nb = self._slices[k]
        hs = self.header_size
        staged.data[off : off + nb] = mv[hs : hs + nb]
        staged.add(k)
        adopt = self.window.received(frame, now)
        if adopt:
            self._adopt(adopt, now)

    def _adopt(self, frames: list[CandidateFrame], now: float) -> None:
        """The staged ``frames`` are the stream's numbering from now on: flush the old stream's open
        frame, forget its recent ids, and place them in the ring in order (the last one stays open
        unless complete)."""
        restart = self.window.has_stream
        old_module = self.window.module_id
        self._count_discarded(self.window.adopt(frames))
        if self._cur_id is not None:
            self._flush()
        self._recent.clear()
        self._last_id = None
        self._last_frame_index = None
        first = frames[0]
        st = self.stats
        st.stream_module_id = first.module_id
        if restart:
            st.numbering_restarts += 1
        if not restart or first.module_id != old_module:
            log.info("module %d: stream of header module id %d from frame number %d (image id %d)%s",
                     self.module_id, first.module_id, first.frame_number, first.image_id,
                     "" if self.window.pinned else "; header_module_ids in the config would pin it")
        else:
            log.info("module %d: new numbering from frame number %d (image id %d)",
                     self.module_id, first.frame_number, first.image_id)
        nbytes = self.layout.frame_nbytes
        ppf = self.packets_per_frame
        for frame in frames:
            staged = self._staging[frame.slot]
            assert staged is not None
            self._open(frame.image_id, PacketInfo(frame.frame_number, 0, frame.pulse_id, frame.daq_rec,
                                                  frame.module_id), now)
            assert self._slot is not None
            self._slot[:nbytes] = staged.data
            self._received[:] = staged.received
            self._n_recv = frame.n_packets
            self._highest = staged.highest
            st.out_of_order_packets += staged.out_of_order
            self.n_stream_packets += frame.n_packets
            if frame is not frames[-1] or frame.n_packets == ppf:
                self._flush()

    def _count_discarded(self, frames: list[CandidateFrame]) -> None:
        """Count the packets of candidate frames that were not adopted, by why they were not the
        stream's: another module id, a straggler behind the stream, or a numbering of their own."""
        if not frames:
            return
        w, st = self.window, self.stats
        for frame in frames:
            if w.module_id is not None and frame.module_id != w.module_id:
                st.rejected_module_id += frame.n_packets
                self._note_foreign(frame.module_id)
            elif w.image_id is not None and 0 <= w.image_id - frame.image_id <= w.ahead:
                st.late_packets += frame.n_packets
            else:
                st.rejected_out_of_window += frame.n_packets

    def _note_foreign(self, module_id: int) -> None:
        ids = self._foreign_ids
        if module_id in ids or len(ids) < 16:
            ids[module_id] = ids.get(module_id, 0) + 1

    def _log_rejections(self, now: float) -> None:
        """At most every ``REJECTION_LOG_INTERVAL`` s: what was rejected since the last line and, for a
        port that took nothing of what it received, what to fix."""
        self._next_rejection_log = now + REJECTION_LOG_INTERVAL
        st = self.stats
        counts = (st.rejected_module_id, st.rejected_out_of_range, st.rejected_out_of_window,
                  self.n_stream_packets)
        module, out_of_range, out_of_window, accepted = (a - b for a, b in zip(counts, self._logged_counts,
                                                                               strict=True))
        self._logged_counts = counts
        foreign = sorted(self._foreign_ids, key=lambda i: -self._foreign_ids[i])
        self._foreign_ids = {}
        if not module + out_of_range + out_of_window:
            return
        parts = []
        if module:
            seen = ", ".join(str(i) for i in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            parts.append(f"{module} of another header module id ({seen})")
        if out_of_range:
            parts.append(f"{out_of_range} with a frame number above 2**48-1 or a pulse id no detector sends")
        if out_of_window:
            parts.append(f"{out_of_window} whose numbering never formed a stream")
        where = f"module {self.module_id} (UDP {self.config.udp_host}:{self.config.udp_port(self.module_id)})"
        expected = self.window.module_id
        if accepted:
            log.warning("%s: rejected %s in the last %.0f s, besides %d packets of its stream",
                        where, "; ".join(parts), REJECTION_LOG_INTERVAL, accepted)
            return
        if module and foreign and self.window.pinned:
            fix = (f'if they come from your detector, set "header_module_ids": {{"{self.module_id}": '
                   f"{foreign[0]}}} in the detector config (it says {expected})")
        elif module and foreign:
            fix = (f"this port follows header module id {expected}; if module id {foreign[0]} is the "
                   f'detector now, set "header_module_ids": {{"{self.module_id}": {foreign[0]}}} in the '
                   "detector config")
        else:
            fix = "is something other than this module's detector sending to this port?"
        log.warning("%s receives only packets it rejects (%s in the last %.0f s): %s",
                    where, "; ".join(parts), REJECTION_LOG_INTERVAL, fix)

    def _recently_flushed(self, image_id: int) -> bool:
        flushed = self._recent.get(image_id)
        return flushed is not None and time.monotonic() - flushed <= self.late_window

    def _is_late(self, image_id: int, k: int) -> bool:
        """A packet of a frame flushed less than ``late_window`` s ago: a duplicate or a straggler.

        Beyond the window the same id is a new frame (a detector whose frame counter restarted)."""
        if not self._recently_flushed(image_id):
            return False
        if image_id == self._last_id and self._last_received[k]:
            self.stats.duplicate_packets += 1
        else:
            self.stats.late_packets += 1
        return True

    def _open(self, image_id: int, info: Any, now: float | None = None) -> None:
        """Open the stream's next frame in its ring slot; the window moves with it and the candidate
        frames that began before are discarded (the stream is still sending)."""
        frame_index = int(info.frame_number)
        now = time.monotonic() if now is None else now
        self._count_discarded(self.window.opened(image_id, frame_index, now))
        self._stream_touched = now
        last = self._last_frame_index
        if last is not None and 1 < frame_index - last <= MAX_FRAME_GAP:
            self.stats.frames_skipped += frame_index - last - 1
        self._last_frame_index = frame_index
        self._cur_id = image_id
        self._cur_fn = frame_index
        self._cur_header = (int(info.pulse_id), frame_index, int(info.daq_rec))
        target = self._direct.ring() if self._direct is not None else None
        if target is not None:  # direct mode: the pixels go into the image ring (readout.direct)
            self.ring.begin_write(image_id)
            data = target.begin_write(image_id)[: self.layout.frame_nbytes]
        else:
            data = self.ring.begin_write(image_id)
        self._cur_direct = target is not None
        self._slot = data.data
        if self._headers is not None:
            self._slot_rows = data[: self.layout.frame_nbytes].reshape(self.packets_per_frame, -1)
        self._received = bytearray(self.packets_per_frame)
        self._received_np = np.frombuffer(self._received, dtype=np.uint8)
        self._n_recv = 0
        self._highest = -1

    def _flush(self) -> None:
        image_id = self._cur_id
        assert image_id is not None and self._slot is not None
        st = self.stats
        n_recv = self._n_recv
        slot = self._slot
        zeros = self._zeros
        if n_recv < self.packets_per_frame:
            received = self._received
            for k, (off, nb) in enumerate(self._slices):
                if not received[k]:
                    slot[off : off + nb] = zeros[:nb]
            st.frames_incomplete += 1
            st.missing_packets += self.packets_per_frame - n_recv
        for off, nb in self._uncovered:
            slot[off : off + nb] = zeros[:nb]
        pulse_id, frame_index, daq_rec = self._cur_header
        packed = ModuleFrame(image_id, pulse_id, frame_index, daq_rec, n_recv, *self._frame_extra).pack()
        if n_recv < self.packets_per_frame and self.packets_per_frame <= MAX_RECEIVED_MAP_PACKETS:
            packed += pack_received(self._received, self.packets_per_frame)
        if self._cur_direct:
            packed = with_direct_flag(packed)
            st.frames_direct += 1
        self.ring.commit(image_id, packed)
        st.frames += 1
        st.last_frame_id = image_id
        self._recent[image_id] = time.monotonic()
        self._recent.move_to_end(image_id)
        if len(self._recent) > RECENT_FRAMES:
            self._recent.popitem(last=False)
        self._last_id = image_id
        self._last_received = self._received
        self._cur_id = None
        self._cur_fn = -1
        self._slot = None
        self._slot_rows = None
        if self._reporter.tick():
            self._reported_packets = st.packets

    # -- lifetime ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self._wake_fd >= 0:
            os.eventfd_write(self._wake_fd, 1)

    def start(self) -> threading.Thread:
        """Run in a daemon thread (tests, in-process pipelines)."""
        thread = threading.Thread(target=self.run, name=f"receiver-{self.module_id}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Release the sockets and the ring (unlinked: this process owns it)."""
        if self._closed:
            return
        self._closed = True
        self._slot = None
        self._slot_rows = None
        self._reporter.close()
        self.sock.close()
        if self._direct is not None:
            self._direct.close()
        os.close(self._wake_fd)
        self._wake_fd = -1
        self.ring.close()


class _Staged:
    """A candidate frame's payloads, which packets arrived and in what order (counted as the
    stream's packets are, if the frame is adopted)."""

    def __init__(self, frame_nbytes: int, packets_per_frame: int) -> None:
        self.data = memoryview(bytearray(frame_nbytes))
        self.received = bytearray(packets_per_frame)
        self._none = bytes(packets_per_frame)
        self.highest = -1
        self.out_of_order = 0

    def clear(self) -> None:
        self.received[:] = self._none
        self.highest = -1
        self.out_of_order = 0

    def add(self, k: int) -> None:
        self.received[k] = 1
        if k < self.highest:
            self.out_of_order += 1
        else:
            self.highest = k


class _StagedSlsHeaders:
    """The SLS header fields the fast path needs, as numpy views of every staging row (no copies)."""

    def __init__(self, layout: SlsLayout, staging: np.ndarray) -> None:
        headers = staging[:, : layout.header_size].view(layout.header_dtype)[:, 0]
        self.frame = headers["framenum"]
        self.packet = headers["packetnum"]
        self.module = headers["module_id"]
        self.detector_type = headers["detector_type"]
        self.header_version = headers["header_version"]
        self.sls_detector_type = layout.sls_detector_type
        #: Jungfrau's bunch id is the pulse id, part of the frame key (Eiger's is ignored)
        self.bunch = headers["bunchid"] if layout.bunchid_is_pulse_id else None
        self.size = layout.max_datagram
        self.packets_per_frame = layout.packets_per_frame

    def run_starts(self, lengths: np.ndarray, n: int) -> list[int]:
        """Where runs of clean datagrams with one frame key and one module id start among the first
        ``n``, plus ``n``.

        Clean mirrors what ``SlsLayout.parse`` accepts (right size, packet index in range, detector
        type and header version, for Jungfrau a bunch id in 0..2**64, NaN not); an unclean datagram
        is a run of its own."""
        frame, packet, module = self.frame[:n], self.packet[:n], self.module[:n]
        clean = lengths[:n] == self.size
        clean &= packet < self.packets_per_frame
        clean &= self.detector_type[:n] == self.sls_detector_type
        clean &= self.header_version[:n] == SLS_HEADER_VERSION
        starts = np.empty(n, dtype=bool)
        starts[0] = True
        np.not_equal(frame[1:], frame[:-1], out=starts[1:])
        starts[1:] |= module[1:] != module[:-1]
        if self.bunch is not None:
            bunch = self.bunch[:n]
            clean &= bunch >= 0.0
            clean &= bunch < 2.0**64
            starts[1:] |= bunch[1:] != bunch[:-1]
        unclean = ~clean
        starts |= unclean
        starts[1:] |= unclean[:-1]
        out: list[int] = starts.nonzero()[0].tolist()
        out.append(n)
        return out


def _uncovered_ranges(slices: list[tuple[int, int]], frame_nbytes: int) -> list[tuple[int, int]]:
    """Byte ranges of a frame no packet writes (zeroed on every flush so they never go stale)."""
    gaps: list[tuple[int, int]] = []
    pos = 0
    for off, nb in sorted(slices):
        if off > pos:
            gaps.append((pos, off - pos))
        pos = max(pos, off + nb)
    if pos < frame_nbytes:
        gaps.append((pos, frame_nbytes - pos))
    return gaps


def main(argv: list[str] | None = None) -> int:
    """``python -m daq_backend.readout.receiver CONFIG MODULE_ID``"""
    from daq_backend.component import build_component, run_service

    parser = argparse.ArgumentParser(prog="std-daq-receiver", description=main.__doc__)
    parser.add_argument("config", help="detector JSON file")
    parser.add_argument("module_id", type=int)
    parser.add_argument("--rcvbuf", type=int, default=None, help="socket receive buffer to ask for (bytes)")
    parser.add_argument("--recv-batch", type=int, default=DEFAULT_RECV_BATCH,
                        help="datagrams per recvmmsg call (0: one recv_into per datagram)")
    parser.add_argument("--rt-priority", type=int, default=None,
                        help="SCHED_FIFO priority, 0 = normal (default: the config's receiver_rt_priority)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = build_component(lambda: load_config(args.config))
    # before the receiver (and its zmq threads) exist, so every thread of the process inherits it
    priority = args.rt_priority if args.rt_priority is not None else config.receiver_rt_priority
    log.info("module %d: %s", args.module_id, apply_rt_priority(priority, f"receiver-{args.module_id}"))
    return run_service(build_component(
        lambda: ModuleReceiver(config, args.module_id, rcvbuf=args.rcvbuf, recv_batch=args.recv_batch)))


if __name__ == "__main__":
    sys.exit(main())
