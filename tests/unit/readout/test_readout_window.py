"""The numbering window of a module's stream (pure logic, time passed in): what continues the stream,
when a new numbering is adopted (restart, far jump), and that stray packets never are."""

from __future__ import annotations

import pytest

from daq_backend.readout.window import CandidateFrame, StreamWindow

PPF = 8  # packets per frame of these tests


def fill(w: StreamWindow, image_id: int, now: float, n: int = PPF, module: int = 0,
         frame_number: int | None = None, pulse_mode: bool | None = None) -> list[CandidateFrame] | None:
    """Stage ``n`` packets of one candidate frame; what ``received`` last said."""
    fn = image_id if frame_number is None else frame_number
    adopt = None
    for _ in range(n):
        frame, _, _ = w.stage(image_id, fn, module, pulse_mode, now)
        adopt = w.received(frame, now)
        if adopt:
            return adopt
    return adopt


def stream_at(newest: int, now: float = 0.0, module: int = 0) -> StreamWindow:
    """A window whose stream (header module id ``module``) just opened frame ``newest``."""
    w = StreamWindow(PPF)
    adopt = fill(w, newest, now, module=module)
    assert adopt is not None
    w.adopt(adopt)
    w.opened(newest, newest, now)
    return w


def ids(frames: list[CandidateFrame] | None) -> list[int]:
    return [f.image_id for f in frames or []]


def test_without_a_stream_the_first_half_frame_starts_one_and_learns_its_module_id() -> None:
    w = StreamWindow(PPF)
    assert not w.has_stream and w.idle(0.0)
    assert fill(w, 5, 0.0, n=PPF // 2 - 1, module=1234) is None  # a few packets are no stream yet
    adopt = fill(w, 5, 0.0, n=1, module=1234)
    assert ids(adopt) == [5]
    assert w.adopt(adopt) == []
    assert w.module_id == 1234 and not w.pinned


def test_the_window_moves_forward_only_and_by_at_most_ahead() -> None:
    w = stream_at(100)
    assert w.in_window(101, 101)
    assert w.in_window(100 + w.ahead, 100 + w.ahead)  # lost frames in between: a gap
    assert not w.in_window(101 + w.ahead, 101 + w.ahead)
    assert not w.in_window(100, 100)  # the newest frame again is no new frame
    assert not w.in_window(3, 3)  # behind: a restart or a straggler, never the stream's next frame
    assert not w.in_window(2**63, 2**63)
    # pulse ids: the image id moves on while frame numbers may repeat (two pulses, one frame number)
    assert w.in_window(105, 100)
    assert not w.in_window(105, 99)


def test_a_restart_is_adopted_after_confirm_frames_complete_frames_while_the_stream_is_silent() -> None:
    w = stream_at(500, now=0.0)
    assert fill(w, 1, 0.01) is None
    assert fill(w, 2, 0.02) is None
    adopt = fill(w, 3, 0.03)  # well before restart_idle: the complete frames confirm it
    assert ids(adopt) == [1, 2, 3]
    w.adopt(adopt)
    for f in adopt:
        w.opened(f.image_id, f.frame_number, 0.03)
    assert w.image_id == 3 and w.in_window(4, 4) and not w.in_window(2, 2)


def test_a_short_restart_is_adopted_once_the_stream_was_silent_restart_idle() -> None:
    w = stream_at(500, now=0.0)
    assert fill(w, 1, 0.1) is None and fill(w, 2, 0.1, n=PPF - 1) is None
    assert w.check(w.restart_idle - 0.01) == (None, [])
    adopt, expired = w.check(w.restart_idle)
    assert ids(adopt) == [1, 2] and expired == []
    assert adopt is not None and adopt[-1].n_packets == PPF - 1  # the receiver keeps it open


def test_a_half_frame_after_silence_is_enough_and_takes_its_numbering_along() -> None:
    w = stream_at(500, now=0.0)
    fill(w, 7, 0.5)  # complete, but alone: no confirmation
    fill(w, 9, 0.6, n=2)  # too few packets: left out
    adopt = fill(w, 8, 2.0, n=PPF // 2)  # the stream has been silent for 2 s
    assert ids(adopt) == [7, 8]


def test_a_second_numbering_interleaved_with_the_stream_is_never_adopted() -> None:
    """A spoofer sending complete frames of its own numbering while the detector sends: each frame
    the stream opens discards what began before it."""
    w = stream_at(100, now=0.0)
    discarded = 0
    for i in range(1, 50):
        now = i * 0.01
        assert fill(w, 10**9 + i, now) is None
        dropped = w.opened(100 + i, 100 + i, now)
        discarded += len(dropped)
    assert discarded == 49 and w.candidates == []
    assert w.image_id == 149


def test_random_packets_never_make_a_frame_and_expire() -> None:
    w = StreamWindow(PPF)
    for i in range(100):
        frame, new, _ = w.stage(2**40 + 7919 * i, 2**40 + 7919 * i, i, None, 0.0)
        assert new and w.received(frame, 0.0) is None
    assert len(w.candidates) == w.n_slots  # bounded
    adopt, expired = w.check(w.expire_after + 0.01)
    assert adopt is None and len(expired) == w.n_slots and w.candidates == []


def test_eviction_keeps_the_frames_of_a_real_restart_under_a_flood_of_strays() -> None:
    w = stream_at(500, now=0.0)
    now = 0.0
    adopted = None
    stray = 0
    for image_id in (1, 2, 3):
        for _packet in range(PPF):
            now += 0.0001
            frame, _, _ = w.stage(image_id, image_id, 0, None, now)
            adopted = w.received(frame, now) or adopted
            for _ in range(3):  # three stray packets between two packets of the real frame
                stray += 1
                now += 0.0001
                frame, _, evicted = w.stage(2**45 + stray, 2**45 + stray, 77, None, now)
                assert all(e.n_packets == 1 for e in evicted)
                w.received(frame, now)
            if adopted:
                break
    assert ids(adopted) == [1, 2, 3]


def test_consecutive_frames_of_another_module_or_id_source_do_not_confirm() -> None:
    w = stream_at(500, now=0.0)
    fill(w, 1, 0.01, module=0)
    fill(w, 2, 0.01, module=9)
    assert fill(w, 3, 0.01, module=0) is None
    w2 = stream_at(500, now=0.0)
    fill(w2, 1, 0.01, pulse_mode=False)
    fill(w2, 2, 0.01, pulse_mode=True)
    assert fill(w2, 3, 0.01, pulse_mode=False) is None


def test_a_pinned_module_id_rejects_every_other_a_learned_one_only_while_the_stream_runs() -> None:
    pinned = StreamWindow(PPF, module_id=31)
    assert pinned.pinned and not pinned.rejects_module(31, 0.0)
    assert pinned.rejects_module(32, 0.0) and pinned.rejects_module(32, 1e9)
    learned = stream_at(10, now=0.0, module=4)
    assert learned.rejects_module(5, 0.5)
    assert not learned.rejects_module(5, learned.restart_idle)  # silent: a new module may take over
    adopt = fill(learned, 1, 2.0, module=5)
    assert adopt is not None
    learned.adopt(adopt)
    assert learned.module_id == 5


def test_the_id_source_of_the_stream_is_part_of_its_window() -> None:
    w = StreamWindow(PPF)
    adopt = fill(w, 20, 0.0, pulse_mode=False)
    assert adopt is not None
    w.adopt(adopt)
    w.opened(20, 20, 0.0)
    assert w.in_window(21, 21, pulse_mode=False)
    assert not w.in_window(21, 21, pulse_mode=True)  # a bunch id where the stream has none


def test_next_deadline_tells_when_waiting_candidates_need_a_look() -> None:
    w = stream_at(500, now=0.0)
    assert w.next_deadline(0.0) is None
    fill(w, 1, 0.2)
    assert w.next_deadline(0.3) == pytest.approx(w.restart_idle)  # when the stream counts as silent
    assert w.next_deadline(5.0) == pytest.approx(0.2 + w.expire_after)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"packets_per_frame": 0}, "packets_per_frame"), ({"confirm_frames": 0}, "confirm_frames"),
     ({"ahead": 0}, "ahead"), ({"restart_idle": 0.0}, "restart_idle"), ({"n_slots": 2}, "n_slots")],
)
def test_bad_parameters_are_named(kwargs: dict, message: str) -> None:
    args = {"packets_per_frame": PPF, **kwargs}
    ppf = args.pop("packets_per_frame")
    with pytest.raises(ValueError, match=message):
        StreamWindow(ppf, **args)
