"""Direct mode (readout.direct): a single-module detector's receiver writes into the image ring."""

from __future__ import annotations

import numpy as np
import pytest

from daq_backend import ipc
from daq_backend.detectors import layout_for
from daq_backend.formats import ImageMetadata, ImageStatus
from daq_backend.ram_buffer import RingBuffer, shm_path
from daq_backend.readout.assembler import ImageAssembler
from daq_backend.readout.direct import direct_possible
from daq_backend.readout.receiver import ModuleReceiver
from daq_backend.simulator.pattern import expected_image, module_datagrams
from daq_backend.simulator.sender import DetectorSimulator
from daq_backend.testing import (
    EIGER_HALF_POSITIONS,
    InProcessReadout,
    UdpSender,
    assert_no_leftovers,
    make_config,
    wait_for,
)


def send(config, ids: range) -> None:  # type: ignore[no-untyped-def]
    with DetectorSimulator(config, rate_hz=50, n_images=len(ids), start_id=ids[0]) as sim:
        sim.run()


def mapped(receiver: ModuleReceiver) -> bool:
    """The receiver's direct-mode target has mapped the image ring that is in /dev/shm now."""
    target = receiver._direct
    path = shm_path(target.name) if target is not None else None
    return path is not None and path.exists() and target.mapped_inode == path.stat().st_ino  # type: ignore[union-attr]


def image_of(ring: RingBuffer, image_id: int) -> tuple[ImageMetadata, np.ndarray]:
    meta = ImageMetadata.unpack(ring.meta(image_id, ImageMetadata.FORMAT.size))
    pixels = ring.view(image_id).view(meta.numpy_dtype)[: meta.height * meta.width]
    data = np.array(pixels.reshape(meta.shape))
    ring.check(image_id)
    return meta, data


@pytest.mark.parametrize(("fields", "direct"), [
    ({"detector_type": "jungfrau"}, True),
    ({"detector_type": "jungfrau", "n_modules": 2}, False),
    ({"detector_type": "jungfrau", "image_pixel_height": 600, "image_pixel_width": 1100,
      "module_positions": {"0": [0, 0, 1023, 511]}}, False),  # the module in a larger image
    ({"detector_type": "eiger", "n_modules": 2, "image_pixel_height": 514, "image_pixel_width": 514,
      "module_positions": EIGER_HALF_POSITIONS}, False),
    ({"detector_type": "gigafrost", "n_modules": 8, "image_pixel_height": 128, "image_pixel_width": 480},
     False),
], ids=["jungfrau-1", "jungfrau-2", "jungfrau-1-gaps", "eiger-2", "gigafrost-8"])
def test_direct_only_where_the_frame_is_the_image(fields: dict, direct: bool) -> None:  # type: ignore[type-arg]
    config = make_config(**fields)
    assert direct_possible(config, layout_for(config)) is direct


def test_single_module_frames_go_straight_into_the_image_ring(ipc_env: str) -> None:
    config = make_config("jungfrau")
    with InProcessReadout(config) as readout:
        receiver = readout.receivers[0]
        frames = RingBuffer.attach(ipc.frame_ring_name(config.detector_name, 0))
        try:
            send(config, range(1, 6))
            readout.wait_images(5)
            for image_id in range(1, 6):
                meta, image = readout.image(image_id)
                assert (meta.id, meta.status) == (image_id, ImageStatus.GOOD)
                np.testing.assert_array_equal(image, expected_image(config, image_id))
                assert not frames.view(image_id).any()  # the pixels never went through the frame ring
            assert receiver.stats.frames_direct == 5 and readout.assembler.stats.images_direct == 5
        finally:
            frames.close()
    assert_no_leftovers(config, ipc_env)


def test_lost_packets_in_direct_mode_are_zeroed_never_stale(ipc_env: str) -> None:
    config = make_config("jungfrau", image_ring_slots=4)
    with InProcessReadout(config) as readout:
        sender = UdpSender(config)
        try:
            sender.send(0, module_datagrams(config, 0, 1))  # slot 1 holds image 1's pixels
            readout.wait_images(1)
            dgrams = module_datagrams(config, 0, 5)  # image 5 reuses slot 1
            sender.send(0, [d for k, d in enumerate(dgrams) if k not in (0, 77)])
            sender.send(0, module_datagrams(config, 0, 6))
            readout.wait_images(3)
        finally:
            sender.close()
        meta, image = readout.image(5)
        assert (meta.status, meta.n_missing_packets) == (ImageStatus.MISSING_PACKETS, 2)
        want = expected_image(config, 5)
        rows = image.shape[0] // 128  # a Jungfrau packet is 4 whole rows
        for k in range(128):
            got, expected = image[k * rows : (k + 1) * rows], want[k * rows : (k + 1) * rows]
            if k in (0, 77):
                assert not got.any(), f"packet {k} was lost but its pixels are not zero"
            else:
                np.testing.assert_array_equal(got, expected)
        assert readout.assembler.stats.images_direct == 3


def test_receiver_started_first_copies_until_the_image_ring_appears(ipc_env: str) -> None:
    config = make_config("jungfrau")
    receiver = ModuleReceiver(config, 0, stats_interval=0.2, late_window=60.0)
    thread = receiver.start()
    assembler: ImageAssembler | None = None
    images: RingBuffer | None = None
    try:
        assert receiver._direct is not None and receiver._direct.attachments == 0
        assembler = ImageAssembler(config, stats_interval=0.2)
        assembler_thread = assembler.start()
        images = RingBuffer.attach(ipc.image_ring_name(config.detector_name))
        send(config, range(1, 3))  # whether copied or direct: every image arrives
        wait_for(lambda: assembler.stats.images == 2, "images 1-2")
        wait_for(lambda: mapped(receiver), "the receiver to map the image ring")
        direct_before = receiver.stats.frames_direct
        send(config, range(3, 6))
        wait_for(lambda: assembler.stats.images == 5, "images 3-5")
        assert receiver.stats.frames_direct == direct_before + 3
        for image_id in range(1, 6):
            np.testing.assert_array_equal(image_of(images, image_id)[1], expected_image(config, image_id))
        assembler.stop()
        assembler_thread.join(30)
    finally:
        receiver.stop()
        thread.join(30)
        receiver.close()
        if images is not None:
            images.close()
        if assembler is not None:
            assembler.close()
    assert_no_leftovers(config, ipc_env)


def test_a_restarted_assemblers_new_image_ring_is_taken_over(ipc_env: str) -> None:
    config = make_config("jungfrau")
    receiver = ModuleReceiver(config, 0, stats_interval=0.2, late_window=60.0)
    thread = receiver.start()
    assembler = ImageAssembler(config, stats_interval=0.2)
    try:
        assembler_thread = assembler.start()
        wait_for(lambda: mapped(receiver), "the receiver to map the image ring")
        send(config, range(1, 3))
        wait_for(lambda: assembler.stats.images_direct == 2, "images 1-2, direct")
        assembler.stop()
        assembler_thread.join(30)
        assembler.close()  # unlinks the image ring; the new assembler creates a new one
        assembler = ImageAssembler(config, stats_interval=0.2)
        assembler_thread = assembler.start()
        wait_for(lambda: mapped(receiver), "the receiver to map the new image ring")
        with RingBuffer.attach(ipc.image_ring_name(config.detector_name)) as images:
            send(config, range(3, 6))
            wait_for(lambda: assembler.stats.images == 3, "images 3-5 in the new ring")
            assert assembler.stats.images_direct == 3 and assembler.stats.lapped_frames == 0
            assert receiver._direct is not None and receiver._direct.attachments == 2
            for image_id in range(3, 6):
                np.testing.assert_array_equal(image_of(images, image_id)[1], expected_image(config, image_id))
        assembler.stop()
        assembler_thread.join(30)
    finally:
        receiver.stop()
        thread.join(30)
        receiver.close()
        assembler.close()
    assert_no_leftovers(config, ipc_env)
