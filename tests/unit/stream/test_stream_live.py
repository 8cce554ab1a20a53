"""Array-1.0 live stream, read by a third-party style consumer: a plain pyzmq SUB and json/numpy only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from daq_backend.config import DetectorConfig
from daq_backend.stream.live import LiveStream, Selection
from daq_backend.testing import wait_for
from daq_backend.testing.stream import Host, Producer, expected_image, make_config


class FakeClock:
    def __init__(self) -> None:
        self.now = -100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def host_a(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DetectorConfig, Producer]]:
    config = make_config()
    a = Host(tmp_path, config, "a")
    monkeypatch.setenv("STD_DAQ_IPC_DIR", str(a.dir))
    monkeypatch.setenv("STD_DAQ_SHM_PREFIX", a.prefix)
    producer = Producer(config)
    yield config, producer
    producer.close()
    a.cleanup()


class Viewer:
    """What a third party would write: SUB, subscribe to everything, decode JSON + raw bytes."""

    def __init__(self, address: str) -> None:
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(address)
        self.frames: list[tuple[dict, np.ndarray]] = []

    def drain(self) -> int:
        while True:
            try:
                header_raw, data = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return len(self.frames)
            header = json.loads(header_raw)
            image = np.frombuffer(data, dtype=header["type"]).reshape(header["shape"])
            self.frames.append((header, image))

    @property
    def ids(self) -> list[int]:
        return [int(header["frame"]) for header, _ in self.frames]


def publish_and_wait(producer: Producer, live: LiveStream, image_id: int, timeout: float = 60.0) -> None:
    producer.publish(image_id)
    wait_for(lambda: live.stats.last_image_id == image_id, f"the live stream to take {image_id}", timeout)


def warm_up(producer: Producer, live: LiveStream, minimum: int) -> list[int]:
    """The live stream's SUB may join the producer late: publish until it has taken ``minimum``
    images and nothing is in flight. Returns the ids it took (a suffix of what was published)."""
    for image_id in range(1, 2000):
        try:
            publish_and_wait(producer, live, image_id, timeout=0.3)
        except AssertionError:
            continue
        if live.stats.images >= minimum:
            return producer.order[-live.stats.images:]
    raise AssertionError("the live stream never received the producer's metadata")


def stream(
    config: DetectorConfig,
    producer: Producer,
    live: LiveStream,
    warm: int,
    plan: list[tuple[float | None, int]],
    clock: FakeClock | None = None,
) -> tuple[Viewer, list[int], list[int]]:
    """Run ``live`` with one viewer: warm up, then for each (clock time or None, count) in ``plan``
    publish ``count`` images with gappy ids. Returns the viewer, the warm-up ids and the test ids."""
    thread = live.start()
    viewer = Viewer(live.address)
    try:
        wait_for(lambda: live.stats.viewers == 1, "the live stream to see its viewer")
        warm_ids = warm_up(producer, live, warm)
        test_ids: list[int] = []
        for now, count in plan:
            if clock is not None and now is not None:
                clock.now = now
            for _ in range(count):
                image_id = 5000 + 7 * len(test_ids)
                publish_and_wait(producer, live, image_id)
                test_ids.append(image_id)
        wait_for(lambda: viewer.drain() == live.stats.sent, "the viewer to receive every frame sent")
        viewer.sub.close()
        wait_for(lambda: live.stats.viewers == 0, "the live stream to notice its viewer left")
    finally:
        viewer.sub.close()
        live.stop()
        thread.join(timeout=30)
        live.close()
    for header, image in viewer.frames:
        assert header["htype"] == "array-1.0"
        assert header["shape"] == list(config.image_shape) and header["type"] == "uint16"
        assert np.array_equal(image, expected_image(config, header["frame"])), f"frame {header['frame']}"
    return viewer, warm_ids, test_ids


def test_forward_sends_every_image(host_a: tuple[DetectorConfig, Producer]) -> None:
    config, producer = host_a
    live = LiveStream(config, "tcp://127.0.0.1:*", "forward")
    viewer, warm, test_ids = stream(config, producer, live, 1, [(None, 12)])
    assert viewer.ids == warm + test_ids
    assert live.stats.dropped_by_hwm == live.stats.lapped == 0


def test_forward_every_nth(host_a: tuple[DetectorConfig, Producer]) -> None:
    config, producer = host_a
    live = LiveStream(config, "tcp://127.0.0.1:*", "forward", every_nth=3)
    viewer, warm, test_ids = stream(config, producer, live, 1, [(None, 12)])
    assert viewer.ids == (warm + test_ids)[::3]


def test_batch_selects_by_image_id(host_a: tuple[DetectorConfig, Producer]) -> None:
    config, producer = host_a
    live = LiveStream(config, "tcp://127.0.0.1:*", "batch", [2, 5])
    viewer, warm, test_ids = stream(config, producer, live, 1, [(None, 20)])
    assert viewer.ids == [i for i in warm + test_ids if i % 5 < 2]
    assert len([i for i in test_ids if i % 5 < 2]) == 8


def test_periodic_sends_bursts(host_a: tuple[DetectorConfig, Producer]) -> None:
    config, producer = host_a
    clock = FakeClock()
    live = LiveStream(config, "tcp://127.0.0.1:*", "periodic", [3, 1.0], clock=clock)
    # Warm-up (at t=-100) uses up its burst of 3; then bursts at t=0 and t=1, none at t=1.5.
    viewer, warm, test_ids = stream(config, producer, live, 4, [(0.0, 10), (1.0, 10), (1.5, 10)], clock)
    assert viewer.ids == warm[:3] + test_ids[0:3] + test_ids[10:13]


def test_no_viewer_means_no_copy(host_a: tuple[DetectorConfig, Producer]) -> None:
    config, producer = host_a
    live = LiveStream(config, "tcp://127.0.0.1:*", "forward")
    thread = live.start()
    try:
        warm_up(producer, live, 3)
        assert live.stats.no_viewer == live.stats.images and live.stats.sent == 0
    finally:
        live.stop()
        thread.join(timeout=30)
        live.close()


@pytest.mark.parametrize(
    ("mode", "param", "message"),
    [
        ("sideways", None, "'sideways' is not one of forward, periodic, batch"),
        ("batch", [3, 2], "m must be an integer >= n=3"),
        ("batch", [1.5, 4], "n must be a positive integer"),
        ("periodic", [2, 0], "f must be > 0 Hz"),
        ("periodic", [2], r"param must be two numbers \[n, f\]"),
    ],
)
def test_bad_selection_is_named(mode: str, param: list[float] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Selection(mode, param)


def test_selection_unit() -> None:
    clock = FakeClock()
    clock.now = 0.0
    periodic = Selection("periodic", [2, 4.0], clock=clock)  # 2 images every 0.25 s
    picked = []
    for i in range(12):
        clock.now = i * 0.05
        picked.append(periodic(i))
    # bursts start at t=0, 0.25, 0.5: images 0,1 / 5,6 / 10,11
    assert [i for i, p in enumerate(picked) if p] == [0, 1, 5, 6, 10, 11]
