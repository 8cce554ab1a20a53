"""Direct mode: a single-module detector's receiver writes its frames straight into the image ring.

When a detector has one required module whose frame *is* the image (raw pixels, frame bytes equal to
image bytes, the layout placing them unchanged: :func:`direct_possible`), the assembler's copy of
every frame into the image ring is pure cost. In direct mode the receiver opens each frame in the
image ring's slot instead of its frame ring's (the same packets, zeros, rules and counters), and still
commits the frame ring slot with the ``ModuleFrame`` as metadata, flagged :data:`DIRECT_FLAG` at
:data:`DIRECT_FLAG_OFFSET`, so the assembler follows it as before. The assembler stays the image
ring's only committer: it checks that the image slot still holds the frame's id as the receiver left
it (``RingBuffer.writing``; a receiver a whole ring ahead has started overwriting it: counted as
lapped, no image), then commits it with the ``ImageMetadata`` as for any image. Readers of the image
ring see no difference.

The receiver writes direct only while it has the image ring mapped (:class:`ImageRingTarget`): the
assembler creates that ring, so a receiver that starts first writes into its frame ring until the
ring appears, and a re-created image ring (a restarted assembler) is taken over at the next frame.
Frames written meanwhile into an image ring the assembler does not have are counted as lapped.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from daq_backend import ipc
from daq_backend.config import DetectorConfig
from daq_backend.detectors.base import DetectorLayout
from daq_backend.formats import RECEIVED_MAP_OFFSET, received_map_nbytes
from daq_backend.ram_buffer import SLOT_META_BYTES, RingBuffer, ShmWatcher

log = logging.getLogger(__name__)

#: Byte of a frame ring slot's metadata that says the frame's pixels are in the image ring slot.
DIRECT_FLAG_OFFSET = SLOT_META_BYTES - 1
DIRECT_FLAG = 1


def direct_possible(config: DetectorConfig, layout: DetectorLayout) -> bool:
    """True when the frame of the detector's only required module, unchanged, is the image.

    Checked by assembling a pseudo-random frame and comparing bytes, so any layout that moves, flips
    or converts pixels is excluded whatever its kind."""
    if len(config.required_modules) != 1 or config.converted:
        return False
    if layout.frame_nbytes != config.image_nbytes:
        return False
    if received_map_nbytes(layout.packets_per_frame) > DIRECT_FLAG_OFFSET - RECEIVED_MAP_OFFSET:
        return False  # the packet map of an incomplete frame would reach the flag
    module = config.required_modules[0]
    frame = np.random.default_rng(0).integers(0, 256, layout.frame_nbytes, dtype=np.uint8)
    image = np.zeros(config.image_shape, dtype=config.image_dtype)
    try:
        layout.assemble(module, frame, image)
    except (ValueError, IndexError):
        return False
    return bool(np.array_equal(image.reshape(-1).view(np.uint8), frame))


def with_direct_flag(meta: bytes) -> bytes:
    """Frame ring slot metadata ``meta`` (a ``ModuleFrame``, maybe a packet map) flagged direct."""
    return meta.ljust(DIRECT_FLAG_OFFSET, b"\0") + bytes((DIRECT_FLAG,))


class ImageRingTarget:
    """The receiver's mapping of the image ring for direct mode (see the module docstring).

    Attaching maps every page of the ring (``ram_buffer._populate``, ~0.1 s per GiB): done at start if
    the ring exists, else in a :class:`~daq_backend.ram_buffer.ShmWatcher` thread when the ring
    appears or is re-created, never in the receive loop. :meth:`ring` (receive loop only) hands out
    the newest mapping and closes the one it replaces."""

    def __init__(self, config: DetectorConfig, frame_nbytes: int) -> None:
        self.name = ipc.image_ring_name(config.detector_name)
        self.frame_nbytes = frame_nbytes
        self._current: RingBuffer | None = None
        self._pending: RingBuffer | None = None
        self._lock = threading.Lock()
        #: image rings taken over (the first one included)
        self.attachments = 0
        self._watcher = ShmWatcher([self.name], self._appeared)
        self._appeared(self.name)

    def _appeared(self, name: str) -> None:
        try:
            ring = RingBuffer.attach(name, timeout=0)
        except (FileNotFoundError, ValueError, OSError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("direct mode: cannot map the image ring %s: %s", name, exc)
            return
        if ring.slot_nbytes < self.frame_nbytes:
            log.warning("direct mode: image ring %s has %d-byte slots, frames have %d: not used", name,
                        ring.slot_nbytes, self.frame_nbytes)
            ring.close()
            return
        with self._lock:
            stale, self._pending = self._pending, ring
        if stale is not None:
            stale.close()

    @property
    def mapped_inode(self) -> int | None:
        """Inode of the newest image ring mapped (taken over at the next frame), None if none."""
        ring = self._pending or self._current
        return None if ring is None else ring.inode

    def ring(self) -> RingBuffer | None:
        """The image ring to open the next frame in (None: not mapped, use the frame ring)."""
        if self._pending is not None:
            with self._lock:
                new, self._pending = self._pending, None
            if new is not None:
                if self._current is not None and new.inode == self._current.inode:
                    new.close()  # the ring we have, reported again
                else:
                    old, self._current = self._current, new
                    self.attachments += 1
                    if old is not None:
                        old.close()
                    log.info("direct mode: frames go straight into the image ring %s", self.name)
        return self._current

    def close(self) -> None:
        self._watcher.close()
        with self._lock:
            pending, self._pending = self._pending, None
        for ring in (pending, self._current):
            if ring is not None:
                ring.close()
        self._current = None
