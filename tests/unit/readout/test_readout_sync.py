"""Synchroniser rules (pure logic, time passed in): release order, eviction, duplicates, drift."""

from __future__ import annotations

import pytest

from daq_backend.formats import ModuleFrame
from daq_backend.readout.sync import Accepted, Release, Synchroniser


def frame(image_id: int, module: int, n_recv: int = 128, frame_index: int | None = None) -> ModuleFrame:
    return ModuleFrame(image_id, 0, image_id if frame_index is None else frame_index, 0, n_recv, module)


def ids(images: list) -> list[int]:
    return [i.image_id for i in images]


def test_complete_image_is_released_with_every_module() -> None:
    s = Synchroniser((0, 1, 2), queue_size=10, timeout=5.0)
    assert s.add(frame(7, 0), 0.0) is Accepted.NEW
    assert s.add(frame(7, 2), 0.0) is Accepted.ADDED
    assert s.pop_ready(0.0) == []
    s.add(frame(7, 1), 0.0)
    (image,) = s.pop_ready(0.0)
    assert image.image_id == 7 and image.complete and sorted(image.frames) == [0, 1, 2]
    assert s.n_pending == 0


def test_out_of_order_completion_is_released_in_id_order() -> None:
    s = Synchroniser((0, 1, 2), queue_size=10, timeout=5.0)
    s.add(frame(1, 0), 0.0)
    s.add(frame(2, 0), 0.0)
    s.add(frame(1, 1), 0.0)
    s.add(frame(2, 1), 0.0)
    assert s.pop_ready(0.0) == []
    # module 2 completes id 2 first: it skipped id 1, and a receiver flushes in order -> 1 is lost
    s.add(frame(2, 2), 0.0)
    released = s.pop_ready(0.0)
    assert ids(released) == [1, 2]
    assert released[0].release is Release.OVERTAKEN and sorted(released[0].frames) == [0, 1]
    assert released[1].complete
    # receivers never announce a module's ids out of order within one numbering: module 2 going
    # back from 2 to 1 restarted its numbering, so this 1 is an image after 2, not image 1 re-opened
    assert s.add(frame(1, 2), 0.0) is Accepted.NEW
    assert s.n_restarts == 1
    assert s.add(frame(2, 0), 0.0) is Accepted.NEW  # module 0 restarted too: the next numbering's 2


def test_duplicate_module_frame_is_ignored_not_the_image() -> None:
    s = Synchroniser((0, 1), queue_size=10, timeout=5.0)
    s.add(frame(3, 0, n_recv=128), 0.0)
    assert s.add(frame(3, 0, n_recv=5), 0.0) is Accepted.DUPLICATE
    s.add(frame(3, 1), 0.0)
    (image,) = s.pop_ready(0.0)
    assert image.complete and image.frames[0].n_recv_packets == 128  # the first one is kept


def test_lost_module_frame_is_released_once_that_module_moved_on() -> None:
    s = Synchroniser((0, 1), queue_size=10, timeout=100.0)
    s.add(frame(10, 0), 0.0)  # module 1 lost frame 10 entirely
    s.add(frame(11, 0), 0.0)
    assert s.pop_ready(0.0) == []  # module 1 has not said anything newer yet
    s.add(frame(11, 1), 0.0)
    released = s.pop_ready(0.0)
    assert ids(released) == [10, 11]
    assert released[0].release is Release.OVERTAKEN and sorted(released[0].frames) == [0]
    assert released[1].complete


def test_incomplete_image_times_out_and_blocks_no_longer() -> None:
    s = Synchroniser((0, 1), queue_size=10, timeout=2.0)
    s.add(frame(5, 0), 10.0)
    assert s.next_deadline() == pytest.approx(12.0)
    assert s.pop_ready(11.9) == []
    (image,) = s.pop_ready(12.0)
    assert image.release is Release.TIMEOUT and image.image_id == 5
    assert s.next_deadline() is None


def test_queue_full_releases_the_oldest() -> None:
    s = Synchroniser((0, 1), queue_size=3, timeout=100.0)
    for i in range(1, 4):
        s.add(frame(i, 0), 0.0)
    assert s.pop_ready(0.0) == []
    s.add(frame(4, 0), 0.0)  # 3 newer ids than id 1 pending now
    (image,) = s.pop_ready(0.0)
    assert image.image_id == 1 and image.release is Release.QUEUE_FULL


def test_frame_of_an_emitted_image_is_late_and_a_module_going_back_is_a_restart() -> None:
    s = Synchroniser((0, 1), queue_size=10, timeout=1.0, late_window=5.0)
    s.add(frame(1, 0), 0.0)
    s.add(frame(1, 1), 0.0)
    s.add(frame(2, 0), 0.0)
    assert ids(s.pop_ready(0.0)) == [1]
    (timed_out,) = s.pop_ready(1.5)
    assert timed_out.image_id == 2
    assert s.add(frame(2, 1), 2.0) is Accepted.LATE
    # receivers announce a module's ids increasing within one numbering: module 0 announcing 1
    # after 2 restarted its frame counter, however soon; it is a new image of the next numbering
    assert s.add(frame(1, 0), 2.0) is Accepted.NEW
    assert s.add(frame(1, 0), 2.0) is Accepted.DUPLICATE  # the same frame twice is still a duplicate
    assert s.add(frame(1, 1), 2.0) is Accepted.ADDED
    (image,) = s.pop_ready(2.0)
    assert image.image_id == 1 and image.complete


def test_restarted_frame_counter_is_not_mistaken_for_overtaken() -> None:
    s = Synchroniser((0, 1), queue_size=10, timeout=100.0, late_window=0.5)
    for i in (50, 51):
        s.add(frame(i, 0), 0.0)
        s.add(frame(i, 1), 0.0)
    assert ids(s.pop_ready(0.0)) == [50, 51]
    s.add(frame(1, 0), 10.0)  # counter restarted at 1; module 1's last id (51) predates this image
    assert s.pop_ready(10.0) == []
    s.add(frame(1, 1), 10.0)
    (image,) = s.pop_ready(10.0)
    assert image.complete and image.image_id == 1


def test_modules_drifting_far_apart_never_raise_and_stay_bounded() -> None:
    """The seed's sync threw when modules drifted by > 100 ids (weakness 7): here every frame ends
    up in a released image or is counted late, and the queue stays bounded."""
    s = Synchroniser((0, 1), queue_size=50, timeout=1.0)
    released = []
    late = 0
    for i in range(1, 1001):
        now = i * 0.001
        for f in (frame(i, 0), frame(i + 500, 1)):
            accepted = s.add(f, now)
            assert accepted in (Accepted.NEW, Accepted.ADDED, Accepted.LATE)
            late += accepted is Accepted.LATE
        released += s.pop_ready(now)
        assert s.n_pending <= s.queue_size + 1
    released += s.drain(2.0)
    assert sum(len(image.frames) for image in released) + late == 2000
    assert all(image.release is not Release.COMPLETE for image in released[:400])


def test_modules_that_are_not_required_are_ignored() -> None:
    s = Synchroniser((0, 2), queue_size=10, timeout=1.0)
    assert s.add(frame(1, 1), 0.0) is Accepted.NOT_REQUIRED
    assert s.n_pending == 0


def test_drain_releases_everything_pending() -> None:
    s = Synchroniser((0, 1), queue_size=10, timeout=100.0)
    s.add(frame(4, 1), 0.0)
    s.add(frame(3, 0), 0.0)
    released = s.drain(0.0)
    assert ids(released) == [3, 4] and all(i.release is Release.SHUTDOWN for i in released)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"required_modules": (), "queue_size": 1, "timeout": 1.0}, "required_modules"),
        ({"required_modules": (0,), "queue_size": 0, "timeout": 1.0}, "queue_size"),
        ({"required_modules": (0,), "queue_size": 1, "timeout": 0.0}, "timeout"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Synchroniser(**kwargs)


def test_a_restart_racing_the_old_numbering_keeps_both_in_order_and_complete() -> None:
    """Module 0 restarts at 1 before module 1's last frames of the old numbering arrive: the old
    images still complete and leave first, then the new numbering, each image once."""
    s = Synchroniser((0, 1), queue_size=10, timeout=100.0)
    released = []
    for f in (frame(99, 0), frame(99, 1), frame(100, 0), frame(1, 0), frame(2, 0), frame(100, 1),
              frame(1, 1), frame(2, 1)):
        assert s.add(f, 0.0) in (Accepted.NEW, Accepted.ADDED)
        released += s.pop_ready(0.0)
    assert ids(released) == [99, 100, 1, 2]
    assert all(image.complete for image in released)
    assert s.n_restarts == 1


def test_a_frame_below_an_image_already_released_is_late_even_after_the_window() -> None:
    s = Synchroniser((0, 1), queue_size=10, timeout=1.0, late_window=1.0)
    for i in (5, 6):
        s.add(frame(i, 0), 0.0)
    assert ids(s.pop_ready(0.0)) == []
    assert ids(s.pop_ready(2.0)) == [5, 6]  # timed out without module 1
    # module 1's frame 5 comes very late: its image left long ago; emitting it now would put 5
    # after 6 into every file
    assert s.add(frame(5, 1), 50.0) is Accepted.LATE
    assert s.add(frame(7, 1), 50.0) is Accepted.NEW


def test_modules_restarting_one_after_the_other_share_the_new_numbering() -> None:
    s = Synchroniser((0, 1, 2), queue_size=10, timeout=100.0)
    for m in (0, 1, 2):
        s.add(frame(10, m), 0.0)
    assert ids(s.pop_ready(0.0)) == [10]
    for m in (0, 1, 2):  # one restart of the detector, seen module by module
        s.add(frame(1, m), 1.0)
    (image,) = s.pop_ready(1.0)
    assert image.image_id == 1 and image.complete
    assert s.n_restarts == 1
