"""The ring's commit log and its follower (ram_buffer.RingFollower) and the futex word under it."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import threading
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from daq_backend import futex
from daq_backend.futex import SharedWord
from daq_backend.ram_buffer import FollowerGroup, RingBuffer, RingFollower, ShmWatcher, shm_path
from daq_backend.testing import wait_for


@pytest.fixture
def ring_name() -> Iterator[str]:
    name = f"stddaq-test-follow-{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        shm_path(name).unlink(missing_ok=True)


@pytest.fixture
def ring_names() -> Iterator[list[str]]:
    names = [f"stddaq-test-group-{uuid.uuid4().hex}" for _ in range(3)]
    try:
        yield names
    finally:
        for name in names:
            shm_path(name).unlink(missing_ok=True)


def _commit(ring: RingBuffer, image_id: int) -> None:
    ring.write(image_id, np.full(16, image_id % 256, dtype=np.uint8), meta=image_id.to_bytes(8, "little"))


def test_commit_log_counts_and_records_ids(ring_name: str) -> None:
    with RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4) as ring:
        assert ring.committed == 0
        for image_id in (7, 8, 10):
            _commit(ring, image_id)
        assert ring.committed == 3
        assert ring.logged_ids(0, 3).tolist() == [7, 8, 10]


def test_follower_starts_at_head_and_takes_in_commit_order(ring_name: str) -> None:
    with RingBuffer.create(ring_name, slot_nbytes=16, n_slots=8) as ring:
        _commit(ring, 1)  # before the follower attached: not its business
        follower = RingFollower(ring_name)
        try:
            assert follower.attach() is not None
            assert not follower.take()
            for image_id in (2, 3, 5):
                _commit(ring, image_id)
            taken = follower.take()
            assert (taken.ids, taken.lapped, taken.reattached) == ([2, 3, 5], 0, False)
            _commit(ring, 6)
            assert follower.take(limit=5).ids == [6]
        finally:
            follower.close()


def test_follower_from_start_sees_earlier_commits(ring_name: str) -> None:
    with RingBuffer.create(ring_name, slot_nbytes=16, n_slots=8) as ring:
        _commit(ring, 1)
        follower = RingFollower(ring_name, from_start=True)
        try:
            assert follower.take().ids == [1]
        finally:
            follower.close()


def test_follower_counts_what_the_producer_lapped(ring_name: str) -> None:
    with RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4) as ring:
        follower = RingFollower(ring_name)
        try:
            follower.attach()
            for image_id in range(10):
                _commit(ring, image_id)
            taken = follower.take()
            # only the last n_slots log entries survive; the six before them are counted, not invented
            assert taken.ids == [6, 7, 8, 9]
            assert taken.lapped == 6
            assert len(taken.ids) + taken.lapped == 10
        finally:
            follower.close()


def test_follower_limit_leaves_the_rest_for_the_next_take(ring_name: str) -> None:
    with RingBuffer.create(ring_name, slot_nbytes=16, n_slots=8) as ring:
        follower = RingFollower(ring_name)
        try:
            follower.attach()
            for image_id in range(5):
                _commit(ring, image_id)
            assert follower.take(limit=2).ids == [0, 1]
            assert follower.take().ids == [2, 3, 4]
        finally:
            follower.close()


def test_follower_moves_to_a_recreated_ring_from_its_first_commit(ring_name: str) -> None:
    ring = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=8)
    follower = RingFollower(ring_name, recheck=0.01)
    try:
        follower.attach()
        _commit(ring, 100)
        assert follower.take().ids == [100]
        ring.close()  # the producer dies ...
        ring = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=8)  # ... and its restart re-creates it
        _commit(ring, 101)
        _commit(ring, 102)
        assert wait_for(lambda: follower.wait(0.05), "the follower to notice the new ring")
        taken = follower.take()
        assert taken.reattached
        assert taken.ids == [101, 102]  # everything the restarted producer made, nothing lost
        assert follower.reattachments == 1
    finally:
        follower.close()
        ring.close()


def test_follower_waits_for_a_ring_that_does_not_exist_yet(ring_name: str) -> None:
    follower = RingFollower(ring_name, recheck=0.01)
    try:
        assert not follower.wait(0.02)
        assert not follower.take()
        with RingBuffer.create(ring_name, slot_nbytes=16, n_slots=8) as ring:
            assert follower.attach() is not None
            _commit(ring, 3)
            assert follower.wait(1.0)
            assert follower.take().ids == [3]
    finally:
        follower.close()


def _produce(name: str, ids: list[int], go: multiprocessing.synchronize.Event) -> None:
    ring = RingBuffer.attach(name, timeout=10)
    go.wait(30)
    # a reader-side attach has the mapping the producer uses in a second process: commit through it
    for image_id in ids:
        ring.begin_write(image_id)[:16] = image_id % 256
        ring.commit(image_id)
    ring.close()


def test_follower_wakes_on_commits_made_by_another_process(ring_name: str) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=64)
    follower = RingFollower(ring_name)
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    proc = ctx.Process(target=_produce, args=(ring_name, list(range(20)), go))
    try:
        follower.attach()
        proc.start()
        go.set()
        seen: list[int] = []

        def more() -> bool:
            if follower.wait(0.5):
                seen.extend(follower.take().ids)
            return len(seen) >= 20

        wait_for(more, "20 commits from the other process")
        assert seen == list(range(20))
    finally:
        proc.join(30)
        follower.close()
        owner.close()


def test_shared_word_wait_returns_on_bump_from_another_thread() -> None:
    mm = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
    word = SharedWord(mm, 0)
    seen = word.value
    woke = threading.Event()

    def sleeper() -> None:
        while not word.wait(seen, 1.0):
            pass
        woke.set()

    thread = threading.Thread(target=sleeper)
    thread.start()
    word.bump()
    assert woke.wait(60)
    thread.join()
    assert word.value == (seen + 1) & 0xFFFFFFFF
    assert not word.wait(word.value, 0.0)
    word.release()
    mm.close()


def test_shared_word_rejects_unaligned_offsets() -> None:
    mm = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
    with pytest.raises(ValueError, match="aligned"):
        SharedWord(mm, 2)
    mm.close()


def test_shared_word_across_fork() -> None:
    mm = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_SHARED)
    word = SharedWord(mm, 8)
    seen = word.value
    pid = os.fork()
    if pid == 0:  # child: wait for the parent's bump, then bump back
        ok = False
        for _ in range(600):
            if word.wait(seen, 0.1):
                ok = True
                break
        word.bump()
        os._exit(0 if ok else 1)
    word.bump()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert word.value == (seen + 2) & 0xFFFFFFFF
    word.release()
    mm.close()


def test_wait_any_returns_on_a_bump_of_any_word() -> None:
    words = [futex.private_word() for _ in range(3)]
    seen = [w.value for w in words]
    assert not futex.wait_any(words, seen, 0.01)
    bumper = threading.Thread(target=words[2].bump)
    bumper.start()
    assert futex.wait_any(words, seen, 60.0)  # the third word's bump ends the one sleep on all three
    bumper.join()
    assert futex.wait_any(words, seen, 0.0)  # a change before the call is seen without sleeping
    with pytest.raises(ValueError):
        futex.wait_any(words, seen[:2], 0.0)


def test_group_wakes_for_whichever_ring_commits_and_takes_per_key(ring_names: list[str]) -> None:
    rings = [RingBuffer.create(name, slot_nbytes=16, n_slots=8) for name in ring_names]
    _commit(rings[0], 1)  # before the group: not its business
    group = FollowerGroup(dict(enumerate(ring_names)), recheck=3600.0)
    try:
        assert not group.wait(0.01) and group.take() == {}
        committer = threading.Thread(target=_commit, args=(rings[2], 7))
        committer.start()
        assert group.wait(60.0)
        committer.join()
        _commit(rings[0], 2)
        taken = group.take()
        assert {key: f.ids for key, f in taken.items()} == {0: [2], 2: [7]}
        assert not group.pending()
        returned = threading.Event()
        sleeper = threading.Thread(target=lambda: (group.wait(3600.0), returned.set()))
        sleeper.start()
        group.wake()
        assert returned.wait(60.0)  # woken with nothing to take: wait returns instead of sleeping on
        sleeper.join()
    finally:
        group.close()
        for ring in rings:
            ring.close()


def test_group_follows_a_ring_created_later_and_a_recreated_one_at_once(ring_names: list[str]) -> None:
    """``recheck`` is an hour: only the watcher (inotify) can have told the group about the rings."""
    first = RingBuffer.create(ring_names[0], slot_nbytes=16, n_slots=8)
    group = FollowerGroup({"a": ring_names[0], "b": ring_names[1]}, recheck=3600.0)
    late: RingBuffer | None = None
    try:
        assert group._watcher.available, "inotify is what finds re-created rings (Linux)"
        late = RingBuffer.create(ring_names[1], slot_nbytes=16, n_slots=8)  # created after the group
        _commit(late, 5)
        assert group.wait(60.0)
        assert group.take()["b"].ids == [5]  # from its first commit
        _commit(first, 10)
        assert group.wait(60.0) and group.take()["a"].ids == [10]
        first.close()  # the producer dies ...
        first = RingBuffer.create(ring_names[0], slot_nbytes=16, n_slots=8)  # ... and restarts
        _commit(first, 1)
        assert group.wait(60.0)
        taken = group.take()["a"]
        assert taken.reattached and taken.ids == [1]
    finally:
        group.close()
        first.close()
        if late is not None:
            late.close()


def test_shm_watcher_reports_only_its_names(ring_names: list[str]) -> None:
    seen: list[str] = []
    appeared = threading.Event()

    def on_appear(name: str) -> None:
        seen.append(name)
        appeared.set()

    watcher = ShmWatcher([ring_names[1]], on_appear)
    try:
        assert watcher.available, "inotify is what finds re-created rings (Linux)"
        with RingBuffer.create(ring_names[0], slot_nbytes=16, n_slots=4), \
                RingBuffer.create(ring_names[1], slot_nbytes=16, n_slots=4):
            assert appeared.wait(60.0)
        assert seen == [ring_names[1]]
    finally:
        watcher.close()
