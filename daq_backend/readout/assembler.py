"""Synchroniser + assembler process: module frames -> images in the image ring (+ ImageMetadata).

Follows the commit log of every required module's frame ring (``ram_buffer.FollowerGroup``: one
futex sleep for all rings per wake-up, however many frames each wake-up finds), reads each frame's
``ModuleFrame`` from its slot metadata, groups them with the ``Synchroniser`` and, for each released
image id, places every required module's frame (read straight from its frame ring) into the image
ring slot with the detector layout (a single-module detector whose frame is the image skips that
copy: its receiver writes straight into the image ring, see ``readout.direct``). There is no
message per frame: a receiver only commits its slot.
A receiver that restarts re-creates its ring; the group moves to the new ring at once (inotify) and
takes it from its first commit. Modules that did not report, or whose frame ring slot was already
overwritten by a newer frame (a lapped slot, checked with the ring's seqlock), are zero-filled and
counted as ``packets_per_frame`` missing packets. Gap pixels between modules are never written, so
they keep the zeros of the freshly created ring. The slot is committed with the 56-byte
``ImageMetadata`` as slot metadata: the image ring's commit log and slot metadata are what the
pipeline's own readers follow.

The same 56 bytes are PUBlished per image on ``ipc.image_metadata_address`` (std-daq's wire format)
for the consumers that take that stream, and only while one is subscribed (an XPUB counts the
subscriptions; with none, no message is made). Who subscribes: ``stream.send`` (replication to
another server), ``stream.live`` (the Array-1.0 live stream), the writer agent as long as it selects
a file's images from that stream, and any external service speaking std-daq's protocol.

``ImageMetadata`` fields: ``status`` = ``ID_MISMATCH`` when the modules' frames of one image id
disagree on the other identifiers (frame index / pulse id, i.e. they are not from the same trigger),
else ``MISSING_PACKETS`` when any packet of any required module is missing, else ``GOOD``;
``user_1`` = missing packets summed over modules; ``user_2`` = this assembler's write sequence
number (1, 2, ...), also in the slot's metadata, so a reader can tell a rewritten slot of the
same id apart.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig, load_config
from daq_backend.detectors import layout_for
from daq_backend.formats import (
    DTYPE_CODES,
    MAX_RECEIVED_MAP_PACKETS,
    RECEIVED_MAP_OFFSET,
    ImageMetadata,
    ImageStatus,
    ModuleFrame,
    received_map_nbytes,
    unpack_received,
)
from daq_backend.ram_buffer import SLOT_META_BYTES, Followed, FollowerGroup, RingBuffer, SlotOverwritten
from daq_backend.readout.direct import DIRECT_FLAG, DIRECT_FLAG_OFFSET, direct_possible
from daq_backend.readout.sync import Accepted, Release, SyncedImage, Synchroniser
from daq_backend.readout.window import MAX_FRAME_GAP
from daq_backend.stats import Counters, StatsReporter, service_name

log = logging.getLogger(__name__)

MODULE_FRAME_NBYTES = ModuleFrame.FORMAT.size

#: Longest sleep with nothing pending (the stats reporter's pace); frames, a ring appearing and
#: ``stop()`` all wake the assembler at once.
IDLE_WAIT = 1.0
#: Frames taken from one ring per wake-up at most, so timeouts and stats still get their turn.
TAKE_LIMIT = 10_000


@dataclass
class AssemblerStats(Counters):
    """``images_skipped``: gaps in the detector's frame counter between consecutive images, i.e.
    images of which no module frame arrived at all (image ids may step by more than 1).
    ``numbering_restarts``: the modules' numbering went back (a new epoch, see ``readout.sync``).
    ``lapped_frames``: frames whose ring slot (or commit log entry) a receiver overwrote before the
    assembler read it; ``bad_messages``: frame ring slots whose metadata is not the ``ModuleFrame`` of
    their id; ``ignored_frames``: frames announcing another module than their ring's;
    ``frame_rings_recreated``: receivers' rings followed anew after a receiver restart;
    ``wakeups``: times the assembler woke and found frames; ``metadata_subscribers``: subscriptions
    to the ``ImageMetadata`` stream now; ``images_published``: images sent on it; ``images_direct``:
    images whose pixels the receiver wrote into the image ring (``readout.direct``)."""

    frames: int = 0
    images: int = 0
    bytes: int = 0
    images_good: int = 0
    images_missing_packets: int = 0
    images_id_mismatch: int = 0
    missing_packets: int = 0
    missing_module_frames: int = 0
    images_skipped: int = 0
    lapped_frames: int = 0
    duplicate_frames: int = 0
    late_frames: int = 0
    ignored_frames: int = 0
    bad_messages: int = 0
    errors: int = 0
    released_overtaken: int = 0
    released_queue_full: int = 0
    released_timeout: int = 0
    released_shutdown: int = 0
    numbering_restarts: int = 0
    frame_rings_recreated: int = 0
    wakeups: int = 0
    metadata_subscribers: int = 0
    images_published: int = 0
    images_direct: int = 0
    pending: int = 0
    last_image_id: int = 0


class ImageAssembler:
    """One per detector; owns the image ring. ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        config: DetectorConfig,
        *,
        stats_interval: float = 1.0,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        self.layout = layout = layout_for(config)
        self.packets_per_frame = layout.packets_per_frame
        self.required = tuple(sorted(config.required_modules))
        self.sync = Synchroniser(self.required, config.module_sync_queue_size, config.module_sync_timeout)
        self.stats = AssemblerStats()
        self.shape = config.image_shape
        self.dtype = np.dtype(config.image_dtype)
        self._dtype_code = DTYPE_CODES[config.image_dtype]
        layout.prepare()
        #: a single-module detector whose frame is the image: its receiver may write straight into
        #: the image ring (``readout.direct``); ids of such frames waiting to be committed
        self._direct = direct_possible(config, layout)
        self._meta_nbytes = SLOT_META_BYTES if self._direct else MODULE_FRAME_NBYTES
        self._direct_ids: set[int] = set()
        #: converted pixel values need the receivers' packet maps to mark what never arrived
        self._marks_missing = config.converted and layout.packets_per_frame <= MAX_RECEIVED_MAP_PACKETS
        self._write_seq = 0
        self._last_frame_index: int | None = None
        self._stop = threading.Event()
        self._closed = False

        self.ring = RingBuffer.create(
            ipc.image_ring_name(config.detector_name), config.image_nbytes, config.image_ring_slots
        )
        self._ctx = context or zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.SNDHWM, max(config.image_ring_slots, 1000))
        self._pub.setsockopt(zmq.LINGER, 500)
        self._pub.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription: subscribers are counted
        self._subscriptions = 0
        address = ipc.image_metadata_address(config.detector_name)
        try:
            self._pub.bind(address)
        except zmq.ZMQError as exc:
            self._pub.close()
            self.ring.close()
            raise RuntimeError(f"assembler of {config.detector_name}: cannot bind {address}: {exc}") from None
        #: the receivers' frame rings, followed through their commit logs
        self._frames: FollowerGroup[int] = FollowerGroup(
            {m: ipc.frame_ring_name(config.detector_name, m) for m in self.required}
        )
        self._reporter = StatsReporter(
            config.detector_name, service_name("assembler"), self._snapshot,
            interval=stats_interval, context=self._ctx,
        )

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        sync = self.sync
        frames = self._frames
        reported_frames = -1
        while not self._stop.is_set():
            deadline = sync.next_deadline()
            now = time.monotonic()
            wait = IDLE_WAIT if deadline is None else min(IDLE_WAIT, max(0.0, deadline - now))
            if self.stats.frames != reported_frames:  # report the last changes once due
                wait = min(wait, self._reporter.due_in(now))
            if frames.wait(wait) and not self._stop.is_set():
                self.stats.wakeups += 1
                self._read_subscriptions()
                self._guarded(self._take_frames, None)
            for image in sync.pop_ready(time.monotonic()):
                self._guarded(self._emit, image)
            if self._reporter.tick():
                reported_frames = self.stats.frames
        self._guarded(self._take_frames, None)
        for image in sync.drain(time.monotonic()):
            self._guarded(self._emit, image)

    def _read_subscriptions(self) -> None:
        """Count the ``ImageMetadata`` stream's subscriptions (XPUB: 1 byte 1/0 + topic each)."""
        pub = self._pub
        while pub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            msg = pub.recv(zmq.NOBLOCK)
            if msg[:1] == b"\x01":
                self._subscriptions += 1
            elif msg[:1] == b"\x00":
                self._subscriptions = max(0, self._subscriptions - 1)
        self.stats.metadata_subscribers = self._subscriptions

    def _guarded(self, step: Callable[[Any], None], arg: Any) -> None:
        """One frame or image failing (a bug, a corrupt frame) is logged and counted; the
        assembler goes on with the next (the seed's synchroniser died instead, weakness 7)."""
        try:
            step(arg)
        except Exception:
            self.stats.errors += 1
            log.exception("assembler of %s: %s failed", self.config.detector_name, step.__name__)

    def _take_frames(self, _: None = None) -> None:
        """Hand every frame committed since the last wake-up to the synchroniser, oldest first.

        With several modules the frames are merged across rings in image id order (split where a
        ring's ids go back: a new numbering), so that one ring's batch cannot fill the synchroniser's
        queue before the other modules' frames of the same images are added."""
        taken = self._frames.take(TAKE_LIMIT)
        if not taken:
            return
        if len(taken) == 1 and len(self.required) == 1:
            ((module, followed),) = taken.items()
            self._note(module, followed)
            ring = self._frames.followers[module].ring
            for image_id in followed.ids:
                self._add_frame(module, ring, image_id)
            return
        order: list[tuple[int, int, int]] = []
        for module, followed in taken.items():
            self._note(module, followed)
            segment, previous = 0, -1
            for image_id in followed.ids:
                if image_id <= previous:
                    segment += 1
                previous = image_id
                order.append((segment, image_id, module))
        order.sort()
        followers = self._frames.followers
        for _segment, frame_id, frame_module in order:
            self._add_frame(frame_module, followers[frame_module].ring, frame_id)

    def _note(self, module: int, followed: Followed) -> None:
        if followed.reattached:
            self.stats.frame_rings_recreated += 1
            log.info("assembler of %s: module %d's frame ring was re-created (receiver restarted): "
                     "following the new one", self.config.detector_name, module)
        if followed.lapped:
            self.stats.lapped_frames += followed.lapped

    def _add_frame(self, module: int, ring: RingBuffer | None, image_id: int) -> None:
        """Read the ``ModuleFrame`` of a committed slot and add it to the synchroniser (a failure is
        logged and counted in ``errors``; the next frame goes on)."""
        st = self.stats
        if ring is None:
            return
        try:
            raw = ring.meta(image_id, self._meta_nbytes)
        except SlotOverwritten:
            st.lapped_frames += 1
            return
        except Exception:
            st.errors += 1
            log.exception("assembler of %s: reading module %d's frame %d failed", self.config.detector_name,
                          module, image_id)
            return
        frame = ModuleFrame.unpack(raw[:MODULE_FRAME_NBYTES])
        if frame.id != image_id:
            st.bad_messages += 1
            return
        st.frames += 1
        if frame.module_id != module:
            st.ignored_frames += 1
            return
        now = time.monotonic()
        direct = self._direct and raw[DIRECT_FLAG_OFFSET] == DIRECT_FLAG
        accepted = self.sync.add(frame, now)
        if accepted is Accepted.DUPLICATE:
            st.duplicate_frames += 1
        elif accepted is Accepted.LATE:
            st.late_frames += 1
        elif accepted is Accepted.NOT_REQUIRED:
            st.ignored_frames += 1
        else:
            if direct:
                self._direct_ids.add(image_id)
            for image in self.sync.pop_ready(now):
                self._guarded(self._emit, image)

    def _emit(self, synced: SyncedImage) -> None:
        st = self.stats
        image_id = synced.image_id
        ppf = self.packets_per_frame
        direct = image_id in self._direct_ids
        if direct:  # the receiver wrote the pixels into the slot: commit it if it still holds them
            self._direct_ids.discard(image_id)
            if not self.ring.writing(image_id):
                st.lapped_frames += 1
                return
            image = None
        else:
            image = self.ring.begin_write(image_id).view(self.dtype).reshape(self.shape)
        missing = 0
        identities: set[tuple[int, int]] = set()
        for module in self.required:
            frame = synced.frames.get(module)
            placed = False
            if frame is None:
                st.missing_module_frames += 1
            else:
                identities.add((frame.frame_index, frame.pulse_id))
                placed = image is None or self._place(module, image_id, image, frame.n_recv_packets)
                if not placed:
                    st.lapped_frames += 1
            if placed:
                missing += ppf - min(frame.n_recv_packets, ppf)  # type: ignore[union-attr]
            else:
                if image is not None:
                    self.layout.zero_module(module, image)
                missing += ppf
        if identities:
            frame_index = min(identities)[0]
            last = self._last_frame_index
            if last is not None and 1 < frame_index - last <= MAX_FRAME_GAP:
                st.images_skipped += frame_index - last - 1
            self._last_frame_index = frame_index
        if len(identities) > 1:
            status = ImageStatus.ID_MISMATCH
            st.images_id_mismatch += 1
        elif missing:
            status = ImageStatus.MISSING_PACKETS
            st.images_missing_packets += 1
        else:
            status = ImageStatus.GOOD
            st.images_good += 1
        self._write_seq += 1
        height, width = self.shape
        packed = ImageMetadata(
            image_id, height, width, self._dtype_code, status, user_1=missing, user_2=self._write_seq
        ).pack()
        self.ring.commit(image_id, packed)
        if self._subscriptions:
            self._pub.send(packed)
            st.images_published += 1
        st.images += 1
        st.images_direct += direct
        st.bytes += self.ring.slot_nbytes
        st.missing_packets += missing
        st.last_image_id = image_id
        if synced.release is not Release.COMPLETE:
            name = f"released_{synced.release.value}"
            setattr(st, name, getattr(st, name) + 1)

    def _place(self, module: int, image_id: int, image: np.ndarray, n_recv_packets: int) -> bool:
        """Copy the module's frame of ``image_id`` into ``image`` (marking the pixels of lost
        packets, see ``mark_missing_packets``); False if its slot no longer (or never) held that frame."""
        ring = self._frames.followers[module].ring
        if ring is None:
            return False
        ppf = self.packets_per_frame
        try:
            self.layout.assemble(module, ring.view(image_id), image)
            if n_recv_packets < ppf and self._marks_missing:
                meta = ring.meta(image_id, RECEIVED_MAP_OFFSET + received_map_nbytes(ppf))
                received = unpack_received(meta[RECEIVED_MAP_OFFSET:], ppf)
                if received.sum() == n_recv_packets:  # else a producer without a map
                    self.layout.mark_missing_packets(module, received, image)
                else:
                    self.layout.zero_module(module, image)
            ring.check(image_id)
        except SlotOverwritten:
            return False
        return True

    def _snapshot(self) -> dict[str, int]:
        self.stats.pending = self.sync.n_pending
        self.stats.numbering_restarts = self.sync.n_restarts
        return self.stats.snapshot()

    # -- lifetime ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self._frames.wake()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="assembler", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Close sockets and frame-ring mappings; unlink the image ring (this process owns it)."""
        if self._closed:
            return
        self._closed = True
        self._reporter.close()
        self._pub.close()
        ipc.unlink_ipc(ipc.image_metadata_address(self.config.detector_name))
        self._frames.close()
        self.ring.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m daq_backend.readout.assembler CONFIG``"""
    from daq_backend.component import build_component, run_service

    parser = argparse.ArgumentParser(prog="std-daq-assembler", description=main.__doc__)
    parser.add_argument("config", help="detector JSON file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = build_component(lambda: load_config(args.config))
    return run_service(build_component(lambda: ImageAssembler(config)))


if __name__ == "__main__":
    sys.exit(main())
