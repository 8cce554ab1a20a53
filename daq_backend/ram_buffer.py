"""Shared-memory slot rings in ``/dev/shm`` (frame rings per module, the image ring).

Layout: a 4 KiB ring header, ``n_slots`` slot headers of 128 bytes, the commit log (``n_slots``
uint64), then the data region (4 KiB aligned, one contiguous block per slot so numpy views and
``write_direct_chunk`` need no copy).

The commit log lets a reader in another process follow the producer without a message per slot:
each ``commit`` appends the slot's id at ``log[seq % n_slots]``, then raises ``committed`` (the
number of commits since the ring was created) and bumps a futex word (:mod:`daq_backend.futex`) that
readers sleep on. :class:`RingFollower` is that reader: it hands out the ids committed since it last
looked, says how many it missed because the producer lapped it, and moves to a re-created ring (a
restarted producer) by itself.

A slot header is a seqlock: ``begin`` (id+1 being written) is set before the data changes and ``end``
(id+1 completely written) after, followed by up to 112 bytes of the producer's metadata. A reader
checks ``end == id+1`` before using a slot and ``begin == id+1`` after: if the writer lapped it the
reader is *told* (``SlotOverwritten``) instead of silently using newer data (reference weakness 10).
Only the creating process unlinks the segment; readers just unmap.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from daq_backend import futex
from daq_backend.futex import SharedWord

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MAGIC = b"STDDAQR2"
#: magic, n_slots, slot_nbytes, data_offset, slot_stride, log_offset
RING_HEADER = struct.Struct("<8sQQQQQ")
#: Offsets in the ring header of the commit counter (uint64) and of the futex word (uint32).
COMMITTED_OFFSET = 64
DOORBELL_OFFSET = 72
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
    """Bytes of /dev/shm a ring of ``n_slots`` slots of ``slot_nbytes`` takes (headers, commit log and
    padding included): what ``RingBuffer.create`` reserves."""
    data_offset = _align(RING_HEADER_BYTES + n_slots * SLOT_HEADER_BYTES + 8 * n_slots, _PAGE)
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
        magic, self.n_slots, self.slot_nbytes, data_offset, self.slot_stride, log_offset = \
            RING_HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC:
            self._mm.close()
            raise ValueError(f"/dev/shm/{name} is not a std-daq ring (bad magic)")
        buf = np.frombuffer(self._mm, dtype=np.uint8)
        self._committed = buf[COMMITTED_OFFSET : COMMITTED_OFFSET + 8].view("<u8")
        self._log = buf[log_offset : log_offset + 8 * self.n_slots].view("<u8")
        self.doorbell = SharedWord(self._mm, DOORBELL_OFFSET)
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
        log_offset = RING_HEADER_BYTES + n_slots * SLOT_HEADER_BYTES
        data_offset = _align(log_offset + 8 * n_slots, _PAGE)
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
            os.pwrite(fd, RING_HEADER.pack(MAGIC, n_slots, slot_nbytes, data_offset, stride, log_offset), 0)
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
        """Publish the slot: metadata first, then ``end`` so readers see a complete slot, then the
        commit log entry and counter, then wake the followers."""
        i = image_id % self.n_slots
        if len(meta) > SLOT_META_BYTES:
            raise ValueError(f"slot metadata is limited to {SLOT_META_BYTES} bytes")
        if meta:
            self._meta[i, : len(meta)] = np.frombuffer(meta, dtype=np.uint8)
        self._seq[i, 1] = image_id + 1
        seq = int(self._committed[0])
        self._log[seq % self.n_slots] = image_id
        self._committed[0] = seq + 1
        self.doorbell.bump()

    @property
    def committed(self) -> int:
        """Commits since the ring was created (the next commit's sequence number)."""
        return int(self._committed[0])

    def logged_ids(self, start: int, stop: int) -> np.ndarray:
        """Ids of commits ``start .. stop-1`` from the commit log (the caller checks they were not
        overwritten meanwhile: only the last ``n_slots`` commits are kept)."""
        return self._log[np.arange(start, stop, dtype=np.uint64) % np.uint64(self.n_slots)]

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

    def writing(self, image_id: int) -> bool:
        """True if the slot's last ``begin_write`` was for ``image_id`` (written or being written)."""
        return bool(self._seq[image_id % self.n_slots, 0] == image_id + 1)

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
        self.doorbell.release()
        del self._seq, self._meta, self._data, self._committed, self._log
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


class Followed:
    """What one :meth:`RingFollower.take` found: the ids committed since the last take, in commit order.

    ``lapped``: commits the follower never saw because the producer overwrote their log entries first
    (the follower fell more than ``n_slots`` commits behind); ``reattached``: the producer re-created
    the ring (a restart) since the last take, so ``ids`` are the new ring's from its first commit."""

    __slots__ = ("ids", "lapped", "reattached")

    def __init__(self, ids: list[int], lapped: int = 0, reattached: bool = False) -> None:
        self.ids = ids
        self.lapped = lapped
        self.reattached = reattached

    def __bool__(self) -> bool:
        return bool(self.ids) or bool(self.lapped) or self.reattached


class RingFollower:
    """Follows a ring's commit log from another process: no message per slot, one futex wait per wake-up.

    ``wait(timeout)`` sleeps until the producer commits (or the timeout passes); ``take()`` returns the
    ids committed since the previous take. The follower starts at the ring's current head (only
    commits made after it attached) unless ``from_start`` is set. Every ``recheck`` seconds of waiting,
    and whenever ``wait`` times out, it checks whether the segment was re-created (a new inode: the
    producer restarted) and then follows the new ring from its first commit, so nothing the restarted
    producer made is missed. Reading a slot stays the caller's business (``view``/``check``/``meta``
    with the seqlock), because a logged id's slot may have been lapped since.
    """

    def __init__(self, name: str, *, from_start: bool = False, populate: bool = True,
                 recheck: float = 0.05) -> None:
        self.name = name
        self.from_start = from_start
        self.populate = populate
        self.recheck = recheck
        self.ring: RingBuffer | None = None
        #: the next commit sequence number to hand out
        self.position = 0
        #: how many times the follower moved to a re-created ring
        self.reattachments = 0
        self._inode = 0
        self._pending_reattach = False
        self._last_check = 0.0

    def attach(self, timeout: float = 0.0) -> RingBuffer | None:
        """Map the ring (waiting up to ``timeout`` s for it to exist); None if it does not exist."""
        if self.ring is None:
            try:
                ring = RingBuffer.attach(self.name, timeout=timeout, populate=self.populate)
            except FileNotFoundError:
                return None
            self.ring, self._inode = ring, ring.inode
            self.position = 0 if (self.from_start or self._pending_reattach) else ring.committed
        return self.ring

    def skip_to_head(self) -> int:
        """Forget what was committed so far: the next take starts with the next commit."""
        ring = self.attach()
        self.position = ring.committed if ring is not None else 0
        self._pending_reattach = False
        return self.position

    def _check_recreated(self) -> bool:
        """Move to a re-created ring if the segment on disk is not the mapped one."""
        self._last_check = time.monotonic()
        try:
            inode = os.stat(shm_path(self.name)).st_ino
        except FileNotFoundError:
            return False
        if self.ring is not None and inode == self._inode:
            return False
        had_ring = self.ring is not None
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if had_ring:
            self.reattachments += 1
            self._pending_reattach = True
        return self.attach() is not None

    def wait(self, timeout: float) -> bool:
        """Sleep until there is something to take, or ``timeout`` s; True if there is."""
        deadline = time.monotonic() + timeout
        while True:
            ring = self.ring or self.attach()
            if ring is not None and (ring.committed != self.position or self._pending_reattach):
                return True
            now = time.monotonic()
            if now - self._last_check >= self.recheck and self._check_recreated():
                continue
            remaining = deadline - now
            if remaining <= 0:
                return False
            step = min(remaining, self.recheck)
            if ring is None:
                time.sleep(min(step, 0.02))
                continue
            seen = ring.doorbell.value
            if ring.committed != self.position:
                return True
            ring.doorbell.wait(seen, step)

    def take(self, limit: int | None = None) -> Followed:
        """The ids committed since the last take (at most ``limit``), oldest first."""
        ring = self.ring or self.attach()
        reattached, self._pending_reattach = self._pending_reattach, False
        if ring is None:
            return Followed([], 0, reattached)
        n = ring.n_slots
        head = ring.committed
        start = self.position
        if head < start:  # cannot happen for one ring; be safe rather than wait forever
            start = 0
        lapped = max(0, head - n - start)
        start += lapped
        stop = head if limit is None else min(head, start + limit)
        ids = ring.logged_ids(start, stop)
        overwritten = max(0, ring.committed - n - start)  # entries the producer reused while we read
        if overwritten:
            overwritten = min(overwritten, stop - start)
            ids = ids[overwritten:]
            lapped += overwritten
        self.position = stop
        return Followed(ids.tolist(), lapped, reattached)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None


#: inotify(7) event bits: a file renamed into the directory (how rings appear), created, deleted
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_INOTIFY_EVENT = struct.Struct("iIII")


class ShmWatcher:
    """Calls ``on_appear(name)`` (from its own thread) when a segment of one of ``names`` appears in
    ``/dev/shm``: a ring created, or re-created by a restarted producer (rings are renamed into place).

    inotify(7) on the directory: the thread sleeps in the kernel until a file is renamed in or
    created, so noticing a re-created ring costs no polling. ``available`` is False where inotify is
    missing (then the caller has to look for re-created rings itself)."""

    def __init__(self, names: Iterable[str], on_appear: Callable[[str], None]) -> None:
        self.names = frozenset(names)
        self._on_appear = on_appear
        self._fd = -1
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            if libc.inotify_add_watch(fd, bytes(SHM_DIR), _IN_MOVED_TO | _IN_CREATE) < 0:
                err = ctypes.get_errno()
                os.close(fd)
                raise OSError(err, f"inotify_add_watch {SHM_DIR}")
        except (OSError, AttributeError) as exc:
            log.info("no inotify on %s (%s): re-created rings are looked for periodically", SHM_DIR, exc)
            return
        self._fd = fd
        self._thread = threading.Thread(target=self._loop, name="shm-watcher", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        return self._fd >= 0

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                continue
            except OSError:
                return
            pos = 0
            while pos + _INOTIFY_EVENT.size <= len(data):
                _, _, _, length = _INOTIFY_EVENT.unpack_from(data, pos)
                start = pos + _INOTIFY_EVENT.size
                name = data[start : start + length].rstrip(b"\0").decode(errors="replace")
                pos = start + length
                if name in self.names:
                    self._on_appear(name)

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(5)
            self._thread = None
        for fd in (self._fd, self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._stop_r = self._stop_w = -1


K = TypeVar("K", bound=Hashable)


class FollowerGroup(Generic[K]):
    """Several rings followed by one thread: one sleep per wake-up, whichever ring was committed to.

    ``rings`` maps a key (e.g. a module number) to a ring name. ``wait(timeout)`` sleeps on every
    mapped ring's futex word at once (:func:`daq_backend.futex.wait_any`) until one of them commits
    or a ring appears; ``take()`` returns, per key, what its :class:`RingFollower` took since the last
    call. A ring that exists when the group is made is followed from its head (commits made before
    are not the group's business); a ring that appears later, and a ring that is re-created (its
    producer restarted), from its first commit. Appearing rings are noticed through a
    :class:`ShmWatcher` at once, without polling; without inotify every ``recheck`` s of waiting."""

    def __init__(self, rings: Mapping[K, str], *, populate: bool = True, recheck: float = 0.05) -> None:
        self.recheck = recheck
        self.followers: dict[K, RingFollower] = {
            key: RingFollower(name, populate=populate, recheck=recheck) for key, name in rings.items()
        }
        self._by_name = {f.name: f for f in self.followers.values()}
        self._bell = futex.private_word()
        self._woken = False
        self._appeared: set[str] = set()
        self._lock = threading.Lock()
        self._watcher = ShmWatcher(self._by_name, self._on_appear)
        for follower in self.followers.values():
            if follower.attach() is None:
                follower.from_start = True  # created after us: everything its producer commits is new
        self._last_check = time.monotonic()

    def _on_appear(self, name: str) -> None:
        with self._lock:
            self._appeared.add(name)
        self._bell.bump()

    def _look_for_rings(self) -> None:
        """Attach rings that appeared and move to re-created ones (what the watcher reported, or, without
        a watcher, every ring every ``recheck`` s)."""
        if self._watcher.available:
            with self._lock:
                names, self._appeared = self._appeared, set()
        else:
            now = time.monotonic()
            if now - self._last_check < self.recheck:
                return
            self._last_check = now
            names = set(self._by_name)
        for name in names:
            follower = self._by_name[name]
            follower._check_recreated()

    def pending(self) -> bool:
        """True if a take would return something (commits not taken yet, or a re-created ring)."""
        for follower in self.followers.values():
            ring = follower.ring
            if follower._pending_reattach or (ring is not None and ring.committed != follower.position):
                return True
        return False

    def wait(self, timeout: float) -> bool:
        """Sleep until there is something to take (True), ``timeout`` s passed or :meth:`wake` was
        called (False)."""
        deadline = time.monotonic() + timeout
        while True:
            bell_seen = self._bell.value
            self._look_for_rings()
            words, seen = [self._bell], [bell_seen]
            for follower in self.followers.values():
                if follower.ring is not None:
                    words.append(follower.ring.doorbell)
                    seen.append(follower.ring.doorbell.value)
            if self.pending():
                return True
            if self._woken:  # set before the bell is bumped: a wake is never slept through
                self._woken = False
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not self._watcher.available:
                remaining = min(remaining, self.recheck)
            futex.wait_any(words, seen, remaining)

    def take(self, limit: int | None = None) -> dict[K, Followed]:
        """What each ring's follower took since the last call (at most ``limit`` ids per ring); keys
        whose follower found nothing are left out."""
        out: dict[K, Followed] = {}
        for key, follower in self.followers.items():
            if follower.ring is None and not follower._pending_reattach:
                continue
            taken = follower.take(limit)
            if taken:
                out[key] = taken
        return out

    def wake(self) -> None:
        """Make a ``wait`` in another thread return at once."""
        self._woken = True
        self._bell.bump()

    def close(self) -> None:
        self._watcher.close()
        for follower in self.followers.values():
            follower.close()
