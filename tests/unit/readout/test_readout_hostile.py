"""Receivers and assembler over real UDP against packets that are not the module's stream: spoofed and
absurd headers mixed into a real stream, a pinned module id, a restarted numbering, lost frames.

Every image must be exactly what the simulator sent (no foreign pixel, no foreign id, ids increasing
within a numbering) and every rejected packet must be counted under its reason."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import pytest

from daq_backend.config import DetectorConfig
from daq_backend.formats import ImageStatus
from daq_backend.readout.window import CONFIRM_FRAMES, MAX_FRAME_GAP
from daq_backend.simulator.pattern import expected_image, module_datagrams, module_frame_bytes
from daq_backend.simulator.sender import DetectorSimulator
from daq_backend.simulator.spoof import Spoofer, SpoofKind
from daq_backend.testing import InProcessReadout, ReceiverHarness, make_config, shm_segments, wait_for

REJECTED = ("rejected_module_id", "rejected_out_of_range", "rejected_out_of_window")


def run(config: DetectorConfig, start_id: int, n: int, rate: float = 100.0) -> None:
    with DetectorSimulator(config, rate_hz=rate, n_images=n, start_id=start_id) as sim:
        sim.run()


def check_images(readout: InProcessReadout, image_ids: list[int]) -> None:
    """Each id is in the ring as sent, good; the published ids end with ``image_ids`` in order."""
    for image_id in image_ids:
        meta, image = readout.image(image_id)
        assert (meta.id, meta.status, meta.n_missing_packets) == (image_id, ImageStatus.GOOD, 0)
        np.testing.assert_array_equal(image, expected_image(readout.config, image_id))


@pytest.fixture
def jf2(ipc_env: str) -> Iterator[DetectorConfig]:
    config = make_config("jungfrau", n_modules=2, frame_ring_slots=64, image_ring_slots=256)
    yield config
    assert shm_segments(config.detector_name) == []


def test_spoofed_and_absurd_packets_in_a_stream_never_reach_an_image(jf2: DetectorConfig) -> None:
    with InProcessReadout(jf2) as readout:
        run(jf2, 1, 5)  # the stream is established
        readout.wait_images(5)
        sim = DetectorSimulator(jf2, rate_hz=50, n_images=80, start_id=6)
        with sim, Spoofer(jf2, 1500, 2400, list(SpoofKind), near=lambda: sim.last_sent_id or 6) as spoofer:
            spoofer.start()
            sim.run()
            assert spoofer.wait(120) and spoofer.error is None
        readout.wait_images(85)
        ids = [m.id for m in readout.metadata]
        assert ids[-80:] == list(range(6, 86))  # nothing else was published, in order
        check_images(readout, list(range(6, 86)))
        for module, receiver in readout.receivers.items():
            expected = spoofer.expected_rejections(module)
            assert sum(expected.values()) == 1200
            wait_for(lambda r=receiver, e=expected: {k: getattr(r.stats, k) for k in e} == e,
                     f"module {module}: {expected}, got {receiver.stats}", 60)
            st = receiver.stats
            assert (st.frames, st.frames_incomplete, st.bad_datagrams, st.numbering_restarts) == (85, 0, 0, 0)
        assert readout.assembler.stats.images_good == 85


def test_a_pinned_module_id_takes_nothing_else_and_a_blind_port_names_the_fix(
    ipc_env: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("daq_backend.readout.receiver.REJECTION_LOG_INTERVAL", 0.2)
    config = make_config("jungfrau", header_module_ids={"0": 1234})
    other = make_config("jungfrau")  # the same detector, without the pin: module id 0 in its headers
    h = ReceiverHarness(config, idle_flush=0.3, late_window=60.0)
    try:
        with caplog.at_level(logging.WARNING, logger="daq_backend.readout.receiver"):
            for image_id in (1, 2, 3):
                h.send(module_datagrams(other, 0, image_id))
            wait_for(lambda: h.receiver.stats.rejected_module_id == 3 * 128, "rejections counted", 60)
            wait_for(lambda: '"header_module_ids": {"0": 0}' in caplog.text, "the blind-port warning", 60)
        assert "receives only packets it rejects" in caplog.text and "it says 1234" in caplog.text
        assert h.receiver.ring.committed == 0  # no frame was committed
        for image_id in (4, 5):
            h.send(module_datagrams(config, 0, image_id))  # the pinned id: the simulator sends it
        assert [h.next_frame().id for _ in range(2)] == [4, 5]
        assert h.slot(5) == module_frame_bytes(config, 0, 5)
        assert h.receiver.stats.stream_module_id == 1234
    finally:
        h.close()


def test_headers_of_another_detector_and_numbers_no_detector_sends_are_rejected(ipc_env: str) -> None:
    config = make_config("jungfrau")
    h = ReceiverHarness(config, idle_flush=0.3, late_window=60.0)
    try:
        good = module_datagrams(config, 0, 7)
        bad = []
        for offset, value in ((46, b"\x01"), (47, b"\x01")):  # an Eiger's detector type; header v1
            d = bytearray(good[3])
            d[offset : offset + 1] = value
            bad.append(bytes(d))
        out_of_range = []
        for field, raw in ((0, (2**48).to_bytes(8, "little")),  # frame number beyond 48 bits
                           (16, np.array([7.5]).tobytes()),  # a fractional pulse id
                           (16, np.array([2.0**60]).tobytes())):  # a pulse id beyond 2**53
            d = bytearray(good[5])
            d[field : field + 8] = raw
            out_of_range.append(bytes(d))
        h.send(good[:64] + bad + out_of_range + good[64:])
        f = h.next_frame()
        assert (f.id, f.n_recv_packets) == (7, 128)
        assert h.slot(7) == module_frame_bytes(config, 0, 7)
        st = h.receiver.stats
        assert (st.bad_datagrams, st.rejected_out_of_range, st.duplicate_packets) == (2, 3, 0)
    finally:
        h.close()


def test_the_last_frame_is_flushed_while_foreign_packets_keep_arriving(ipc_env: str) -> None:
    config = make_config("jungfrau")
    h = ReceiverHarness(config, idle_flush=0.3, late_window=60.0)
    try:
        h.send(module_datagrams(config, 0, 1))
        assert h.next_frame().id == 1
        h.send(module_datagrams(config, 0, 2)[:-1])  # its last packet is lost
        with Spoofer(config, 1000, 600_000, [SpoofKind.FOREIGN_MODULE], near=lambda: 2) as spoofer:
            spoofer.start()
            f = h.next_frame()
            assert not spoofer.wait(0)  # the flood goes on: the stream's silence flushed the frame
        assert (f.id, f.n_recv_packets) == (2, 127)
    finally:
        h.close()


def test_a_restarted_numbering_without_a_pause_is_adopted_after_confirm_frames(jf2: DetectorConfig) -> None:
    with InProcessReadout(jf2) as readout:
        run(jf2, 1, 40, rate=200)
        run(jf2, 1, 40, rate=200)  # the detector's frame counter starts over at once
        readout.wait_images(80)
        assert [m.id for m in readout.metadata][-80:] == list(range(1, 41)) * 2
        check_images(readout, list(range(1, 41)))  # the ring holds the second numbering's images
        for receiver in readout.receivers.values():
            st = receiver.stats
            assert (st.frames, st.numbering_restarts, st.frames_incomplete) == (80, 1, 0)
            assert st.rejected_out_of_window == st.late_packets == 0  # the staged frames were placed
        assert readout.assembler.stats.numbering_restarts == 1
        assert readout.assembler.stats.images_good == 80


def test_a_short_restart_after_a_pause_is_adopted(ipc_env: str) -> None:
    assert CONFIRM_FRAMES > 1
    config = make_config("jungfrau")
    with InProcessReadout(config, late_window=0.2) as readout:
        run(config, 1, 3)
        readout.wait_images(3)
        time.sleep(0.3)  # beyond the receivers' late window: id 1 is no straggler of the first 1
        run(config, 1, 1)  # one frame: too few to confirm; adopted once the old stream was silent
        readout.wait_images(4)
        assert [m.id for m in readout.metadata][-4:] == [1, 2, 3, 1]
        check_images(readout, [1])
        assert readout.receivers[0].stats.numbering_restarts == 1


def test_lost_frames_are_a_gap_and_a_jump_beyond_the_window_a_new_numbering(jf2: DetectorConfig) -> None:
    with InProcessReadout(jf2) as readout:
        run(jf2, 1, 10)
        run(jf2, 1000, 10)  # 989 frames lost in between
        far = 10_000 + MAX_FRAME_GAP + 1
        run(jf2, far, 10)
        readout.wait_images(30)
        want = [*range(1, 11), *range(1000, 1010), *range(far, far + 10)]
        assert [m.id for m in readout.metadata][-30:] == want
        check_images(readout, [*range(1000, 1010), *range(far, far + 10)])
        for receiver in readout.receivers.values():
            st = receiver.stats
            assert (st.frames, st.frames_skipped, st.numbering_restarts) == (30, 989, 1)
        assert readout.assembler.stats.images_skipped == 989


def test_eiger_headers_of_the_other_half_module_are_foreign(ipc_env: str) -> None:
    """slsDetectorPackage's virtual Eiger sends module id N on one port and N + 1 on the other."""
    from daq_backend.testing import EIGER_HALF_POSITIONS

    config = make_config("eiger", n_modules=2, image_pixel_height=514, image_pixel_width=514,
                         module_positions=EIGER_HALF_POSITIONS, header_module_ids={"0": 31, "1": 32})
    with InProcessReadout(config) as readout:
        run(config, 1, 3)
        readout.wait_images(3)
        sender = readout.sender
        crossed = module_datagrams(config, 1, 4)  # port 1's packets sent to port 0
        sender.send(0, crossed)
        run(config, 5, 2)
        readout.wait_images(5)
        assert [m.id for m in readout.metadata][-5:] == [1, 2, 3, 5, 6]
        check_images(readout, [5, 6])
        wait_for(lambda: readout.receivers[0].stats.rejected_module_id == len(crossed), "rejections", 60)


def test_spoofing_needs_a_detector_with_slsdetector_headers(ipc_env: str) -> None:
    config = make_config("gigafrost", n_modules=8, image_pixel_height=512, image_pixel_width=480)
    with pytest.raises(ValueError, match="slsDetector headers"):
        Spoofer(config, 10, 1)
    with pytest.raises(ValueError, match="pulse-ids"):
        Spoofer(make_config("jungfrau", image_id_source="frame_index"), 10, 1, ["pulse-ids"])
