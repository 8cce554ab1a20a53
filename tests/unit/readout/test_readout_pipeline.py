"""Simulator -> receivers -> synchroniser/assembler -> image ring, in threads of the test process.

Pixel-exact for every detector of issue 2, and every loss case: the image carries the exact number
of missing packets, missing pixels are zero (the slot held an older non-zero image before), the next
image is unaffected, bad input is counted and never crashes anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig
from daq_backend.detectors import layout_for
from daq_backend.formats import ImageMetadata, ImageStatus, ModuleFrame
from daq_backend.ram_buffer import RingBuffer, SlotOverwritten
from daq_backend.readout.assembler import ImageAssembler
from daq_backend.readout.receiver import ModuleReceiver
from daq_backend.simulator.pattern import expected_image, module_datagrams
from daq_backend.simulator.sender import DetectorSimulator
from daq_backend.testing import (
    EIGER_HALF_POSITIONS,
    JF4_POSITIONS,
    InProcessReadout,
    assert_no_leftovers,
    check_images,
    make_config,
    run_simulator,
    wait_for,
)

N_IMAGES = 20


def check_published(readout: InProcessReadout) -> None:
    """What the assembler PUBlished equals the slot metadata (the SUB may have missed the first)."""
    wait_for(lambda: readout.metadata and readout.metadata[-1].id == readout.assembler.stats.last_image_id,
             "published metadata")
    for meta in readout.metadata:
        assert ImageMetadata.unpack(readout.ring.meta(meta.id, ImageMetadata.FORMAT.size)) == meta


CASES = {
    "jungfrau-1": dict(detector_type="jungfrau", n_modules=1),
    "jungfrau-4": dict(detector_type="jungfrau", n_modules=4, image_pixel_height=1024, image_pixel_width=2048,
                       module_positions=JF4_POSITIONS),
    "eiger-2x16": dict(detector_type="eiger", n_modules=2, bit_depth=16, image_pixel_height=514,
                       image_pixel_width=514, module_positions=EIGER_HALF_POSITIONS),
    "eiger-2x32": dict(detector_type="eiger", n_modules=2, bit_depth=32, image_pixel_height=514,
                       image_pixel_width=514, module_positions=EIGER_HALF_POSITIONS),
    "gigafrost-2016": dict(detector_type="gigafrost", n_modules=8, image_pixel_height=2016,
                           image_pixel_width=2016),
    "gigafrost-128x480": dict(detector_type="gigafrost", n_modules=8, image_pixel_height=128,
                              image_pixel_width=480),
}


@pytest.mark.parametrize("case", list(CASES))
def test_images_are_pixel_exact(ipc_env: str, case: str) -> None:
    config = make_config(**CASES[case])
    with InProcessReadout(config) as readout:
        sim = run_simulator(config, rate_hz=50, n_images=N_IMAGES)
        readout.wait_images(N_IMAGES)
        check_images(readout, range(1, N_IMAGES + 1))
        check_published(readout)
        st = readout.assembler.stats
        assert (st.images, st.images_good, st.missing_packets) == (N_IMAGES, N_IMAGES, 0)
        for receiver in readout.receivers.values():
            assert receiver.stats.frames == N_IMAGES
            assert receiver.stats.packets == sim.n_sent_packets // len(readout.receivers)
    assert_no_leftovers(config, ipc_env)


# -- lost data ---------------------------------------------------------------------------------

LOSS_ID = 5  # shares slot 1 with image 1 in a 4-slot image ring, so stale data would show


@pytest.fixture
def two_modules(ipc_env: str) -> Iterator[InProcessReadout]:
    """(Frame slots are reused in the receiver tests; here the frame rings hold the whole test so a
    busy machine cannot make the assembler fall behind by a ring.)"""
    config = make_config("jungfrau", n_modules=2, image_ring_slots=4)
    with InProcessReadout(config) as readout:
        yield readout
    assert_no_leftovers(config, ipc_env)


def lost_pixels(config: DetectorConfig, module_id: int, packets: list[int]) -> np.ndarray:
    """Mask of the image pixels carried by ``packets`` of ``module_id``."""
    layout = layout_for(config)
    frame = np.full(layout.frame_nbytes, 0xFF, dtype=np.uint8)
    for k in packets:
        off, nb = layout.packet_slice(k)
        frame[off : off + nb] = 0
    image = np.ones(config.image_shape, dtype=config.image_dtype)
    layout.assemble(module_id, frame, image)
    return image == 0


@pytest.mark.parametrize(
    "lost", [[0], [64], [127], [0, 1, 126, 127], list(range(128))],
    ids=["first", "middle", "last", "several", "whole-module-frame"],
)
def test_lost_packets_give_status_exact_count_and_zeros(
    two_modules: InProcessReadout, lost: list[int]
) -> None:
    readout, config = two_modules, two_modules.config
    if len(lost) == 128:
        faults: dict[str, Any] = {"drop_frames": [(LOSS_ID, 1)]}
    else:
        faults = {"drop_packets": [(LOSS_ID, 1, k) for k in lost]}
    run_simulator(config, rate_hz=50, n_images=7, **faults)
    readout.wait_images(7)
    check_images(readout, range(6, 8))  # the next images are unaffected
    meta, image = readout.image(LOSS_ID)
    assert (meta.status, meta.n_missing_packets) == (ImageStatus.MISSING_PACKETS, len(lost))
    missing = lost_pixels(config, 1, lost)
    assert missing.sum() == len(lost) * 4 * 1024
    assert not image[missing].any(), "pixels of lost packets must be zero, not stale"
    np.testing.assert_array_equal(image[~missing], expected_image(config, LOSS_ID)[~missing])
    st = readout.assembler.stats
    assert (st.images_missing_packets, st.missing_packets) == (1, len(lost))
    assert st.missing_module_frames == (1 if len(lost) == 128 else 0)


def test_converted_jungfrau_marks_lost_packets_and_modules_nan(ipc_env: str, tmp_path: Path) -> None:
    """A converted pixel of 0 would be (0 - pedestal) * gain, a plausible value: what never arrived is
    NaN, exactly the rows of the lost packets (the receivers' packet maps), and a whole lost module."""
    h, w = 1024, 1024
    rng = np.random.default_rng(7)
    parameters = tmp_path / "pedestal_gain.h5"
    with h5py.File(parameters, "w") as f:
        f["pedestals"] = rng.uniform(100, 200, (3, h, w)).astype(np.float32)
        f["gains"] = rng.uniform(0.5, 2.0, (3, h, w)).astype(np.float32)
    config = make_config("jungfrau", n_modules=2, image_ring_slots=4, pedestal_gain_file=str(parameters))
    lost = [0, 63, 127]
    with InProcessReadout(config) as readout:
        run_simulator(config, rate_hz=50, n_images=7,
                      drop_packets=[(LOSS_ID, 1, k) for k in lost], drop_frames=[(LOSS_ID + 1, 0)])
        readout.wait_images(7)
        check_images(readout, [4, 7])
        meta, image = readout.image(LOSS_ID)
        assert (meta.status, meta.n_missing_packets) == (ImageStatus.MISSING_PACKETS, len(lost))
        missing = np.zeros(config.image_shape, dtype=bool)
        for k in lost:  # module 1 is the lower half; packet k carries its rows 4k..4k+3
            missing[512 + 4 * k : 512 + 4 * k + 4] = True
        assert np.isnan(image[missing]).all()
        np.testing.assert_array_equal(image[~missing], expected_image(config, LOSS_ID)[~missing])
        meta, image = readout.image(LOSS_ID + 1)  # module 0's frame never came
        assert meta.n_missing_packets == 128
        assert np.isnan(image[:512]).all()
        np.testing.assert_array_equal(image[512:], expected_image(config, LOSS_ID + 1)[512:])
    assert_no_leftovers(config, ipc_env)


def test_image_lost_entirely_is_counted_not_silently_skipped(ipc_env: str) -> None:
    """With one module nobody announces a frame lost entirely: the frame counter's gap tells."""
    config = make_config("jungfrau")
    with InProcessReadout(config) as readout:
        run_simulator(config, rate_hz=50, n_images=5, drop_frames=[(3, 0)])
        readout.wait_images(4)
        check_images(readout, [1, 2, 4, 5])
        assert not readout.ring.holds(3)
        assert readout.assembler.stats.images_skipped == 1
        assert readout.receivers[0].stats.frames_skipped == 1


def test_last_packet_of_the_last_image_lost(two_modules: InProcessReadout) -> None:
    """No next frame flushes it: the receiver's idle flush must."""
    run_simulator(two_modules.config, rate_hz=50, n_images=3, drop_packets=[(3, 0, 127)])
    two_modules.wait_images(3)
    meta, image = two_modules.image(3)
    assert (meta.status, meta.n_missing_packets) == (ImageStatus.MISSING_PACKETS, 1)
    assert not image[508:512].any()


def test_duplicates_reordering_and_garbage_are_counted_never_harmful(ipc_env: str) -> None:
    config = make_config("jungfrau", n_modules=2)
    with InProcessReadout(config) as readout:
        sim = run_simulator(
            config, rate_hz=50, n_images=10, garbage_every=50,
            duplicate=[(3, 0, 5), (3, 0, 127), (4, 1, 0)], out_of_order=[(6, 0), (7, 1)],
        )
        readout.wait_images(10)
        check_images(readout, range(1, 11))
        r0, r1 = readout.receivers[0].stats, readout.receivers[1].stats
        assert r0.bad_datagrams + r1.bad_datagrams == sim.n_garbage > 0
        assert (r0.duplicate_packets, r1.duplicate_packets) == (2, 1)
        assert r0.out_of_order_packets > 0 and r1.out_of_order_packets > 0
        assert r0.frames == r1.frames == 10
        assert readout.assembler.stats.images_good == 10


def test_modules_disagreeing_on_the_trigger_give_id_mismatch(ipc_env: str) -> None:
    config = make_config("jungfrau", n_modules=2, image_id_source="pulse_id")
    with InProcessReadout(config) as readout:
        pulse_id = 1000
        readout.sender.send(0, module_datagrams(config, 0, pulse_id, frame_number=17, pulse_id=pulse_id))
        readout.sender.send(1, module_datagrams(config, 1, pulse_id, frame_number=18, pulse_id=pulse_id))
        readout.wait_images(1)
        meta, image = readout.image(pulse_id)
        assert (meta.status, meta.n_missing_packets) == (ImageStatus.ID_MISMATCH, 0)
        np.testing.assert_array_equal(image, expected_image(config, pulse_id))
        assert readout.assembler.stats.images_id_mismatch == 1


def test_a_lost_module_frame_does_not_hold_back_later_images(ipc_env: str) -> None:
    """Module 1 skipping an id releases it at module 1's next frame, not after the sync timeout."""
    config = make_config("jungfrau", n_modules=2, module_sync_timeout=3600.0, module_sync_queue_size=1000)
    with InProcessReadout(config) as readout:
        run_simulator(config, rate_hz=50, n_images=4, drop_frames=[(2, 1)])
        readout.wait_images(4)
        assert readout.image(2)[0].n_missing_packets == 128
        assert readout.assembler.stats.released_overtaken == 1


# -- ring readers that fall behind ---------------------------------------------------------------


def test_reader_of_the_image_ring_that_falls_behind_is_told(ipc_env: str) -> None:
    config = make_config("jungfrau", image_ring_slots=4)
    with InProcessReadout(config) as readout:
        run_simulator(config, rate_hz=50, n_images=2)
        readout.wait_images(2)
        reader = RingBuffer.attach(ipc.image_ring_name(config.detector_name))
        held = reader.view(1)  # a slow consumer still working on image 1
        first_seq = ImageMetadata.unpack(reader.meta(1, ImageMetadata.FORMAT.size)).user_2
        with DetectorSimulator(config, rate_hz=50, n_images=4, start_id=3) as sim:
            sim.run()
        readout.wait_images(6)
        with pytest.raises(SlotOverwritten, match="no longer holds id 1"):
            reader.check(1)
        with pytest.raises(SlotOverwritten):
            reader.view(2)
        assert np.array_equal(held.view("<u2").reshape(512, 1024), expected_image(config, 5))
        assert ImageMetadata.unpack(reader.meta(5, ImageMetadata.FORMAT.size)).user_2 > first_seq
        del held
        reader.close()


def test_lapped_frame_ring_slot_is_zeroed_and_counted(ipc_env: str) -> None:
    """The assembler finds a module's frame slot (or its commit log entry) already overwritten by newer
    frames. Driven step by step in this thread (``_take_frames``: what one wake-up does), so every
    overwrite happens exactly between two looks of the assembler."""
    config = make_config("jungfrau", n_modules=2, frame_ring_slots=4, image_ring_slots=4)
    layout = layout_for(config)
    rings = [RingBuffer.create(ipc.frame_ring_name(config.detector_name, m), layout.frame_nbytes, 4)
             for m in (0, 1)]
    assembler = ImageAssembler(config)
    images = RingBuffer.attach(ipc.image_ring_name(config.detector_name))

    def commit(module: int, image_id: int, fill: int, meta: bytes | None = None) -> None:
        frame = ModuleFrame(image_id, 0, image_id, 0, 128, module).pack() if meta is None else meta
        rings[module].write(image_id, np.full(layout.frame_nbytes, fill, np.uint8), frame)

    try:
        commit(0, 1, 7)
        commit(1, 1, 7)
        assembler._take_frames()
        assert images.holds(1) and images.read(1)[:4] == b"\x07\x07\x07\x07"
        commit(0, 5, 5)
        assembler._take_frames()  # module 0's frame 5 waits for module 1's
        commit(0, 9, 9)  # ... and is overwritten meanwhile (slot 1 of 4)
        commit(1, 5, 5)
        assembler._take_frames()
        meta = ImageMetadata.unpack(images.meta(5, ImageMetadata.FORMAT.size))
        assert (meta.status, meta.n_missing_packets) == (ImageStatus.MISSING_PACKETS, 128)
        top = np.frombuffer(images.read(5), np.uint8)[: layout.frame_nbytes]
        assert not top.any()  # module 0's part zeroed, never module 0's frame 9
        assert assembler.stats.lapped_frames == 1
        for image_id in range(10, 16):  # 6 commits into 4 slots before the next look: 2 never seen
            commit(1, image_id, 1)
        assembler._take_frames()
        assert assembler.stats.lapped_frames == 3
        commit(0, 20, 2, b"not a module frame")
        commit(0, 21, 2, ModuleFrame(21, 0, 21, 0, 128, 1).pack())  # module 1's frame in module 0's ring
        assembler._take_frames()
        assert (assembler.stats.bad_messages, assembler.stats.ignored_frames) == (1, 1)
    finally:
        images.close()
        assembler.close()
        for ring in rings:
            ring.close()
    assert_no_leftovers(config, ipc_env)


def test_assembler_survives_a_failing_image(ipc_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config("jungfrau", n_modules=2)  # two modules: the assembler places every frame
    with InProcessReadout(config) as readout:
        layout = readout.assembler.layout
        assemble = layout.assemble

        def failing(module_id: int, frame: np.ndarray, image: np.ndarray) -> None:
            if frame[:2].view("<u2")[0] == expected_image(config, 2)[0, 0]:
                raise RuntimeError("simulated bug")
            assemble(module_id, frame, image)

        monkeypatch.setattr(layout, "assemble", failing)
        run_simulator(config, rate_hz=50, n_images=3)
        wait_for(lambda: readout.assembler.stats.errors == 1 and readout.assembler.stats.images == 2,
                 "image 2 failing, 1 and 3 assembled", 60)
        check_images(readout, [1, 3])


def test_restarted_receiver_with_a_new_ring_is_picked_up(ipc_env: str) -> None:
    config = make_config("jungfrau")
    with InProcessReadout(config) as readout:
        run_simulator(config, rate_hz=50, n_images=2)
        readout.wait_images(2)
        old = readout.receivers[0]
        old.stop()
        readout._threads[1].join(30)
        old.close()  # unlinks its ring; the new receiver creates a new segment (new inode)
        new = ModuleReceiver(config, 0, stats_interval=0.2)
        readout.receivers[0] = new
        readout._threads[1] = new.start()
        with DetectorSimulator(config, rate_hz=50, n_images=3, start_id=3) as sim:
            sim.run()
        readout.wait_images(5)
        check_images(readout, range(3, 6))


def test_image_a_module_never_reports_is_released_after_the_sync_timeout(ipc_env: str) -> None:
    config = make_config("jungfrau", n_modules=2, module_sync_timeout=1.0)
    with InProcessReadout(config) as readout:
        readout.sender.send(0, module_datagrams(config, 0, 42))  # module 1 stays silent
        readout.wait_images(1)
        meta, image = readout.image(42)
        assert (meta.status, meta.n_missing_packets) == (ImageStatus.MISSING_PACKETS, 128)
        assert not image[512:].any()
        np.testing.assert_array_equal(image[:512], expected_image(config, 42)[:512])
        assert readout.assembler.stats.released_timeout == 1


def test_image_metadata_is_published_only_while_somebody_subscribes(ipc_env: str) -> None:
    """The assembler counts the subscriptions of its ImageMetadata stream (XPUB) and makes no message
    while there are none; a subscriber gets exactly the slot metadata. Driven step by step in this
    thread, as one wake-up of the assembler does it."""
    config = make_config("jungfrau", n_modules=2)
    layout = layout_for(config)
    rings = [RingBuffer.create(ipc.frame_ring_name(config.detector_name, m), layout.frame_nbytes, 8)
             for m in (0, 1)]
    assembler = ImageAssembler(config)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)

    def image(image_id: int) -> None:
        for m in (0, 1):
            rings[m].write(image_id, np.zeros(layout.frame_nbytes, np.uint8),
                           ModuleFrame(image_id, 0, image_id, 0, 128, m).pack())
        assembler._read_subscriptions()
        assembler._take_frames()

    try:
        image(1)
        assert (assembler.stats.images, assembler.stats.images_published) == (1, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(ipc.image_metadata_address(config.detector_name))
        wait_for(lambda: (assembler._read_subscriptions(), assembler.stats.metadata_subscribers == 1)[1],
                 "the subscription counted")
        image(2)
        assert sub.poll(60_000), "image 2's metadata was not published"
        published = ImageMetadata.unpack(sub.recv())
        assert published == ImageMetadata.unpack(assembler.ring.meta(2, ImageMetadata.FORMAT.size))
        assert assembler.stats.images_published == 1
        sub.close()
        wait_for(lambda: (assembler._read_subscriptions(), assembler.stats.metadata_subscribers == 0)[1],
                 "the unsubscription counted")
        image(3)
        assert (assembler.stats.images, assembler.stats.images_published) == (3, 1)
    finally:
        sub.close()
        assembler.close()
        for ring in rings:
            ring.close()
    assert_no_leftovers(config, ipc_env)
