"""Shared-memory slot rings in ``/dev/shm`` (frame rings per module, the image ring).

Layout: a 4 KiB ring header, ``n_slots`` slot headers of 128 bytes, then the data region
(4 KiB aligned, one contiguous block per slot so numpy views and ``write_direct_chunk`` need no copy).

A slot header is a seqlock: ``begin`` (id+1 being written) is set before the data changes and ``end``
(id+1 completely written) after, followed by up to 112 bytes of the producer's metadata. A reader
checks ``end == id+1`` before using a slot and ``begin == id+1`` after: if the writer lapped it the
reader is *told* (``SlotOverwritten``) instead of silently using newer data (reference weakness 10).
Only the creating process unlinks the segment; readers just unmap.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
MAGIC = b"STDDAQR1"
RING_HEADER = struct.Struct("<8sQQQQ")  # magic, n_slots, slot_nbytes, data_offset, slot_stride
RING_HEADER_BYTES = 4096
SLOT_HEADER_BYTES = 128
SLOT_META_BYTES = SLOT_HEADER_BYTES - 16
_PAGE = 4096
#: madvise(2) advice missing from Python's mmap module (Linux >= 5.14).
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23


def _populate(mm: mmap.mmap, *, write: bool) -> None:
    """Fault the whole mapping in now, not during an acquisition.

    Why: ``posix_fallocate`` on tmpfs reserves pages without touching them, so the first write to each
    still costs a page fault, and in a VM a host-side fault too (measured on the CI VM: 2.7 ms per MiB
    on never-used memory, 0.33 ms on used memory). The owner zero-fills every page through its mapping
    (``MADV_POPULATE_WRITE``); readers only build their page tables (``MADV_POPULATE_READ``), so that
    no process takes minor faults on its first pass through the ring. Best effort: older kernels lack
    the advice and then fault on first use, as before."""
    try:
        mm.madvise(MADV_POPULATE_WRITE if write else MADV_POPULATE_READ)
    except OSError:
        pass


class SlotOverwritten(RuntimeError):
    """The slot no longer (or not yet) holds the requested id: the reader fell behind."""


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def ring_nbytes(slot_nbytes: int, n_slots: int) -> int:
    """Bytes of /dev/shm a ring of ``n_slots`` slots of ``slot_nbytes`` takes (header and padding
    included): what ``RingBuffer.create`` reserves."""
    data_offset = _align(RING_HEADER_BYTES + n_slots * SLOT_HEADER_BYTES, _PAGE)
    return _align(data_offset + n_slots * _align(slot_nbytes, 64), _PAGE)


def shm_path(name: str) -> Path:
    if "/" in name or not name:
        raise ValueError(f"invalid shared-memory name {name!r}")
    return SHM_DIR / name


class RingBuffer:
    """One writer, many readers. ``slot = id % n_slots``."""

    def __init__(self, name: str, fd: int, owner: bool, *, populate: bool = True) -> None:
        self.name = name
        self.owner = owner
        stat = os.fstat(fd)
        size = stat.st_size
        self.inode = stat.st_ino  # a re-created ring is a new file: readers compare inodes to notice
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)
        if populate:
            _populate(self._mm, write=owner)
        magic, self.n_slots, self.slot_nbytes, data_offset, self.slot_stride = RING_HEADER.unpack_from(
            self._mm, 0
        )
        if magic != MAGIC:
            self._mm.close()
            raise ValueError(f"/dev/shm/{name} is not a std-daq ring (bad magic)")
        buf = np.frombuffer(self._mm, dtype=np.uint8)
        hdr = buf[RING_HEADER_BYTES : RING_HEADER_BYTES + self.n_slots * SLOT_HEADER_BYTES]
        hdr = hdr.reshape(self.n_slots, SLOT_HEADER_BYTES)
        self._seq = hdr[:, :16].view("<u8")  # [:, 0] begin, [:, 1] end
        self._meta = hdr[:, 16:]
        data = buf[data_offset : data_offset + self.n_slots * self.slot_stride]
        self._data = data.reshape(self.n_slots, self.slot_stride)[:, : self.slot_nbytes]
        self._closed = False

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, slot_nbytes: int, n_slots: int) -> RingBuffer:
        """Create (or re-create after a crash) the ring; the caller becomes its owner."""
        if slot_nbytes <= 0 or n_slots <= 0:
            raise ValueError("slot_nbytes and n_slots must be positive")
        path = shm_path(name)
        stride = _align(slot_nbytes, 64)
        data_offset = _align(RING_HEADER_BYTES + n_slots * SLOT_HEADER_BYTES, _PAGE)
        size = ring_nbytes(slot_nbytes, n_slots)
        # Built under a temporary name and renamed into place: readers never see a half-made ring, and
        # a re-created ring is a new file (new inode) while old readers keep their intact mapping.
        building = path.with_name(f".{name}.{os.getpid()}.creating")
        fd = os.open(building, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o660)
        try:
            os.ftruncate(fd, size)
            # Reserve every page now (ENOSPC here, not SIGBUS mid-acquisition); the owner's mapping
            # then writes them all once (see ``_populate``).
            os.posix_fallocate(fd, 0, size)
            os.pwrite(fd, RING_HEADER.pack(MAGIC, n_slots, slot_nbytes, data_offset, stride), 0)
            os.rename(building, path)
        except OSError as exc:
            os.close(fd)
            building.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:  # without fallocate this would be a SIGBUS mid-acquisition
                raise OSError(exc.errno, f"ring {name}: /dev/shm has no room for {size >> 20} MiB ({n_slots} "
                              f"slots of {slot_nbytes} bytes); free space or use fewer slots") from None
            raise
        return cls(name, fd, owner=True)

    @classmethod
    def attach(cls, name: str, timeout: float | None = None, *, populate: bool = True) -> RingBuffer:
        """Open an existing ring as a reader, waiting up to ``timeout`` s for its owner to create it.

        ``populate=False`` for a short look (one image, a few slot headers): mapping every page of a
        GB-sized ring costs more than the look itself."""
        path = shm_path(name)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fd = os.open(path, os.O_RDWR)
                if os.fstat(fd).st_size >= RING_HEADER_BYTES and os.pread(fd, 8, 0) == MAGIC:
                    return cls(name, fd, owner=False, populate=populate)
                os.close(fd)  # rings appear complete (renamed into place): this is something else
                raise ValueError(f"/dev/shm/{name} is not a std-daq ring (bad magic or too short); remove "
                                 "it or choose another detector name")
            except FileNotFoundError:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                raise FileNotFoundError(f"ring /dev/shm/{name} does not exist (is its producer running?)")
            time.sleep(0.02)

    # -- writer side --------------------------------------------------------------------------
    def slot_index(self, image_id: int) -> int:
        return image_id % self.n_slots

    def begin_write(self, image_id: int) -> np.ndarray:
        """Mark the slot of ``image_id`` as being written and return its bytes (uint8 view)."""
        i = image_id % self.n_slots
        self._seq[i, 1] = 0
        self._seq[i, 0] = image_id + 1
        return self._data[i]

    def commit(self, image_id: int, meta: bytes = b"") -> None:
        """Publish the slot: metadata first, then ``end`` so readers see a complete slot."""
        i = image_id % self.n_slots
        if len(meta) > SLOT_META_BYTES:
            raise ValueError(f"slot metadata is limited to {SLOT_META_BYTES} bytes")
        if meta:
            self._meta[i, : len(meta)] = np.frombuffer(meta, dtype=np.uint8)
        self._seq[i, 1] = image_id + 1

    def write(self, image_id: int, data: bytes | np.ndarray, meta: bytes = b"") -> None:
        """Copy ``data`` into the slot and commit (convenience for producers that own a buffer)."""
        dst = self.begin_write(image_id)
        src = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data
        src = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
        dst[: src.size] = src
        self.commit(image_id, meta)

    # -- reader side --------------------------------------------------------------------------
    def view(self, image_id: int) -> np.ndarray:
        """The slot's bytes if it holds ``image_id`` completely; else ``SlotOverwritten``.

        The view aliases shared memory: call ``check(image_id)`` after using it."""
        i = image_id % self.n_slots
        if self._seq[i, 1] != image_id + 1 or self._seq[i, 0] != image_id + 1:
            raise SlotOverwritten(self._describe(i, image_id))
        return self._data[i]

    def check(self, image_id: int) -> None:
        """Raise ``SlotOverwritten`` if the writer started overwriting ``image_id``'s slot."""
        i = image_id % self.n_slots
        if self._seq[i, 0] != image_id + 1:
            raise SlotOverwritten(self._describe(i, image_id))

    def holds(self, image_id: int) -> bool:
        i = image_id % self.n_slots
        return self._seq[i, 1] == image_id + 1 and self._seq[i, 0] == image_id + 1

    def read(self, image_id: int) -> bytes:
        """A consistent copy of the slot (for consumers that need to own the bytes)."""
        data = bytes(self.view(image_id))
        self.check(image_id)
        return data

    def meta(self, image_id: int, nbytes: int) -> bytes:
        """The slot's metadata bytes, checked like ``read`` (never half of a newer id's)."""
        i = image_id % self.n_slots
        if not self.holds(image_id):
            raise SlotOverwritten(self._describe(i, image_id))
        data = bytes(self._meta[i, :nbytes])
        self.check(image_id)
        return data

    def newest_id(self) -> int | None:
        """Highest completely written id in the ring, if any."""
        ends = self._seq[:, 1]
        top = int(ends.max())
        return top - 1 if top else None

    def _describe(self, i: int, image_id: int) -> str:
        begin, end = int(self._seq[i, 0]), int(self._seq[i, 1])
        if end:
            holds = f"id {end - 1}"
        else:
            holds = "nothing yet" if not begin else f"id {begin - 1} (being written)"
        return f"ring {self.name}: slot {i} no longer holds id {image_id}, it holds {holds}"

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap; the owner also unlinks the segment (readers never do)."""
        if self._closed:
            return
        self._closed = True
        del self._seq, self._meta, self._data
        try:
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes away with it
        if self.owner:
            shm_path(self.name).unlink(missing_ok=True)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AttachedRing:
    """A ring this process reads but does not own; re-attached when the producer re-created the
    segment (a new inode after a restart), so a producer restart heals without restarting us."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ring: RingBuffer | None = None
        self._inode = 0

    def get(self, timeout: float = 0.0) -> RingBuffer | None:
        """The mapped ring, attaching first (waiting up to ``timeout`` s for it to exist); else None."""
        if self.ring is None:
            try:
                self.ring = RingBuffer.attach(self.name, timeout=timeout)
            except FileNotFoundError:
                return None
            self._inode = self.ring.inode
        return self.ring

    def refreshed(self) -> bool:
        """Re-attach if the segment on disk is not the mapped one; True if the mapping changed."""
        try:
            inode = os.stat(shm_path(self.name)).st_ino
        except FileNotFoundError:
            return False
        if self.ring is not None and inode == self._inode:
            return False
        self.close()
        return self.get() is not None

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
