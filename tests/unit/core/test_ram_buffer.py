"""The /dev/shm slot rings (daq_backend.ram_buffer): layout, write/commit/read, overwrite detection,
attach and recreate."""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from daq_backend import ram_buffer
from daq_backend.ram_buffer import (
    MAGIC,
    RING_HEADER_BYTES,
    SLOT_META_BYTES,
    AttachedRing,
    RingBuffer,
    SlotOverwritten,
    shm_path,
)


@pytest.fixture
def ring_name():
    """A unique /dev/shm name; whatever a test leaves at that path is removed afterwards."""
    name = f"stddaq-test-core-{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        shm_path(name).unlink(missing_ok=True)


@pytest.fixture
def rings():
    """Rings a test opened; closed afterwards (readers first, owners last)."""
    opened: list[RingBuffer] = []
    try:
        yield opened
    finally:
        for ring in sorted(opened, key=lambda r: r.owner):
            ring.close()


def test_shm_path() -> None:
    assert shm_path("abc") == Path("/dev/shm/abc")
    for bad in ("", "a/b", "/abs"):
        with pytest.raises(ValueError, match="invalid shared-memory name"):
            shm_path(bad)


def test_create_layout(ring_name, rings) -> None:
    ring = RingBuffer.create(ring_name, slot_nbytes=100, n_slots=4)
    rings.append(ring)
    assert ring.owner
    assert (ring.n_slots, ring.slot_nbytes, ring.slot_stride) == (4, 100, 128)
    path = shm_path(ring_name)
    st = os.stat(path)
    assert st.st_size % 4096 == 0
    assert st.st_size >= RING_HEADER_BYTES + 4 * 128
    with open(path, "rb") as fh:
        assert fh.read(8) == MAGIC
    assert ring.begin_write(0).shape == (100,)
    assert ring.slot_index(9) == 1


def test_create_rejects_bad_sizes(ring_name) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        RingBuffer.create(ring_name, slot_nbytes=0, n_slots=4)
    with pytest.raises(ValueError, match="must be positive"):
        RingBuffer.create(ring_name, slot_nbytes=16, n_slots=0)
    assert not shm_path(ring_name).exists()


def test_create_allocates_whole_segment(ring_name, rings, monkeypatch) -> None:
    calls = []
    real = ram_buffer.os.posix_fallocate

    def spy(fd, offset, length):
        calls.append((offset, length))
        return real(fd, offset, length)

    monkeypatch.setattr(ram_buffer.os, "posix_fallocate", spy)
    rings.append(RingBuffer.create(ring_name, slot_nbytes=64 * 1024, n_slots=4))
    st = os.stat(shm_path(ring_name))
    assert calls == [(0, st.st_size)]
    assert st.st_blocks * 512 >= st.st_size  # every page is backed, none left to fault in later


def _mapped_kib(path: Path) -> int:
    """Resident kB of this process' mapping(s) of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_owner_and_readers_map_every_page_before_use(ring_name, rings) -> None:
    """No page of a ring may first be faulted in during an acquisition (ram_buffer._populate)."""
    owner = RingBuffer.create(ring_name, slot_nbytes=256 * 1024, n_slots=8)
    rings.append(owner)
    size_kib = os.stat(shm_path(ring_name)).st_size // 1024
    assert _mapped_kib(shm_path(ring_name)) >= size_kib  # the owner's mapping alone
    owner.close()
    rings.remove(owner)
    rings.append(RingBuffer.create(ring_name, slot_nbytes=256 * 1024, n_slots=8))
    reader = RingBuffer.attach(ring_name)
    rings.append(reader)
    assert _mapped_kib(shm_path(ring_name)) >= 2 * size_kib  # owner + reader, nothing touched yet
    glance = RingBuffer.attach(ring_name, populate=False)  # a short look maps only what it reads
    rings.append(glance)
    assert _mapped_kib(shm_path(ring_name)) < 3 * size_kib


def test_create_enospc_names_ring_and_leaves_no_file(ring_name, monkeypatch) -> None:
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ram_buffer.os, "posix_fallocate", no_room)
    with pytest.raises(OSError) as info:
        RingBuffer.create(ring_name, slot_nbytes=4096, n_slots=8)
    assert info.value.errno == errno.ENOSPC
    assert f"ring {ring_name}" in str(info.value)
    assert "/dev/shm has no room" in str(info.value)
    assert not shm_path(ring_name).exists()


def test_create_other_oserror_is_reraised_and_leaves_no_file(ring_name, monkeypatch) -> None:
    def broken(fd, offset, length):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ram_buffer.os, "posix_fallocate", broken)
    with pytest.raises(OSError, match="I/O error") as info:
        RingBuffer.create(ring_name, slot_nbytes=4096, n_slots=8)
    assert info.value.errno == errno.EIO
    assert not shm_path(ring_name).exists()


def test_write_commit_and_read_from_reader(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=32, n_slots=4)
    rings.append(owner)
    reader = RingBuffer.attach(ring_name, timeout=0)
    rings.append(reader)
    assert not reader.owner
    assert (reader.n_slots, reader.slot_nbytes, reader.slot_stride) == (4, 32, 64)
    assert reader.newest_id() is None
    assert not reader.holds(0)

    dst = owner.begin_write(5)
    dst[:] = np.arange(32, dtype=np.uint8)
    assert not reader.holds(5)  # begun, not committed
    owner.commit(5, meta=b"meta-5")
    assert reader.holds(5)
    assert reader.newest_id() == 5
    view = reader.view(5)
    assert np.array_equal(view, np.arange(32, dtype=np.uint8))
    reader.check(5)
    assert reader.meta(5, 6) == b"meta-5"
    assert reader.read(5) == bytes(range(32))

    owner.write(6, np.full(8, 0x01020304, dtype="<u4"), meta=b"m6")
    assert reader.newest_id() == 6
    assert reader.view(6)[:4].tobytes() == b"\x04\x03\x02\x01"
    assert reader.holds(5)  # a different slot, untouched


def test_view_of_unwritten_slot(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    rings.append(owner)
    with pytest.raises(SlotOverwritten, match="slot 2 no longer holds id 2, it holds nothing yet"):
        owner.view(2)
    with pytest.raises(SlotOverwritten):
        owner.meta(2, 4)


def test_view_of_slot_being_rewritten(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    rings.append(owner)
    reader = RingBuffer.attach(ring_name, timeout=0)
    rings.append(reader)
    owner.write(1, b"a" * 16)
    assert reader.read(1) == b"a" * 16

    owner.begin_write(5)  # same slot as 1, newer id, not committed yet
    assert not reader.holds(1)
    with pytest.raises(SlotOverwritten, match=r"id 1, it holds id 5 \(being written\)"):
        reader.view(1)
    with pytest.raises(SlotOverwritten):
        reader.check(1)
    with pytest.raises(SlotOverwritten):
        reader.meta(1, 4)
    with pytest.raises(SlotOverwritten):
        reader.view(5)  # not complete yet either

    owner.commit(5)
    with pytest.raises(SlotOverwritten, match=r"no longer holds id 1, it holds id 5$"):
        reader.view(1)
    assert reader.holds(5)
    assert reader.newest_id() == 5


def test_check_after_view_detects_overwrite_meanwhile(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    rings.append(owner)
    reader = RingBuffer.attach(ring_name, timeout=0)
    rings.append(reader)
    owner.write(3, b"x" * 16)
    view = reader.view(3)
    reader.check(3)  # nothing happened yet
    owner.write(7, b"y" * 16)  # laps slot 3 while the reader still uses its view
    assert bytes(view) == b"y" * 16  # the view aliases shared memory...
    with pytest.raises(SlotOverwritten, match="ring .*: slot 3 no longer holds id 3, it holds id 7"):
        reader.check(3)  # ...so check() must tell the reader
    del view


def test_commit_rejects_oversized_meta(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    rings.append(owner)
    owner.begin_write(0)
    owner.commit(0, meta=b"m" * SLOT_META_BYTES)
    assert owner.meta(0, SLOT_META_BYTES) == b"m" * SLOT_META_BYTES
    owner.begin_write(1)
    with pytest.raises(ValueError, match=f"limited to {SLOT_META_BYTES} bytes"):
        owner.commit(1, meta=b"m" * (SLOT_META_BYTES + 1))
    assert not owner.holds(1)


def test_only_owner_unlinks_on_close(ring_name) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    try:
        reader = RingBuffer.attach(ring_name, timeout=0)
        reader.close()
        reader.close()  # idempotent
        assert shm_path(ring_name).exists()
    finally:
        owner.close()
    assert not shm_path(ring_name).exists()
    owner.close()  # idempotent


def test_close_with_outstanding_view(ring_name) -> None:
    with RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4) as owner:
        owner.write(0, b"z" * 16)
        reader = RingBuffer.attach(ring_name, timeout=0)
        view = reader.view(0)
        reader.close()  # must not raise although a view is alive
        assert bytes(view) == b"z" * 16
        del view
    assert not shm_path(ring_name).exists()  # context manager closed (and unlinked) the owner


def test_attach_missing_ring(ring_name) -> None:
    with pytest.raises(FileNotFoundError, match=f"ring /dev/shm/{ring_name} does not exist"):
        RingBuffer.attach(ring_name, timeout=0)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        RingBuffer.attach(ring_name, timeout=0.1)
    assert time.monotonic() - t0 >= 0.1


def test_attach_waits_for_producer(ring_name, rings) -> None:
    created: list[RingBuffer] = []

    def produce() -> None:
        time.sleep(0.05)
        created.append(RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4))

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        reader = RingBuffer.attach(ring_name, timeout=5)
        rings.append(reader)
        assert reader.n_slots == 4
    finally:
        thread.join()
        rings.extend(created)


def test_attach_refuses_file_that_is_not_a_ring(ring_name) -> None:
    path = shm_path(ring_name)
    path.write_bytes(b"NOTARING" + b"\0" * (2 * RING_HEADER_BYTES))
    with pytest.raises(ValueError, match="is not a std-daq ring"):
        RingBuffer.attach(ring_name, timeout=None)  # refused at once, not waited for
    # The constructor itself checks the magic too.
    fd = os.open(path, os.O_RDWR)
    with pytest.raises(ValueError, match="is not a std-daq ring"):
        RingBuffer(ring_name, fd, owner=False)
    assert path.exists()


def test_attach_refuses_truncated_file(ring_name) -> None:
    shm_path(ring_name).write_bytes(MAGIC)  # right magic, but shorter than the ring header
    with pytest.raises(ValueError, match="too short"):
        RingBuffer.attach(ring_name, timeout=0)


def test_recreating_a_ring_after_a_crash_gives_a_new_file(ring_name, rings) -> None:
    """An owner killed without unlinking: its successor's ring is a new file (new inode), readers of
    the old one keep an intact mapping and AttachedRing notices the change."""
    first = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    first.write(0, b"1" * 16)
    attached = AttachedRing(ring_name)
    old = attached.get()
    assert old is not None
    try:
        second = RingBuffer.create(ring_name, slot_nbytes=64, n_slots=8)  # no unlink in between
        rings.append(second)
        assert second.inode != old.inode
        assert old.read(0) == b"1" * 16  # the old mapping is untouched (no truncation, no SIGBUS)
        assert attached.refreshed() is True
        assert attached.ring is not None and attached.ring.slot_nbytes == 64
        assert [p.name for p in shm_path(ring_name).parent.glob(f".{ring_name}.*")] == []
    finally:
        first.owner = False  # its file was replaced: do not unlink the successor's
        first.close()
        attached.close()


def test_attached_ring_get_waits_for_the_ring(ring_name, rings) -> None:
    attached = AttachedRing(ring_name)
    timer = threading.Timer(0.2, lambda: rings.append(RingBuffer.create(ring_name, 16, 4)))
    timer.start()
    try:
        assert attached.get(timeout=30) is not None
    finally:
        timer.join()
        attached.close()


def test_attached_ring_reattaches_after_recreate(ring_name, rings) -> None:
    attached = AttachedRing(ring_name)
    try:
        assert attached.get() is None  # producer not running
        assert not attached.refreshed()

        first = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
        rings.append(first)
        first.write(0, b"1" * 16)
        ring = attached.get()
        assert ring is not None and not ring.owner
        assert ring.read(0) == b"1" * 16
        assert attached.get() is ring
        assert attached.refreshed() is False  # same segment
        assert attached.ring is ring

        rings.remove(first)
        first.close()  # owner unlinks; producer restarts with a new segment (new inode)
        assert attached.refreshed() is False  # nothing on disk: keep the old mapping
        second = RingBuffer.create(ring_name, slot_nbytes=32, n_slots=8)
        rings.append(second)
        second.write(0, b"2" * 32)
        assert attached.refreshed() is True
        new = attached.ring
        assert new is not None and new is not ring
        assert (new.n_slots, new.slot_nbytes) == (8, 32)
        assert new.read(0) == b"2" * 32
        assert attached.refreshed() is False
    finally:
        attached.close()
    assert attached.ring is None
    assert shm_path(ring_name).exists()  # a reader's close never unlinks
