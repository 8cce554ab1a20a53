"""Buffer replication: stream-send on "host A" (in this process, beside a stand-in producer) and
stream-recv on "host B" (a separate process tree with its own ipc dir and /dev/shm prefix, optionally
in its own network namespace). B's ring and B's ImageMetadata stream must equal A's, image for image,
and every image that is not on B must be counted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from daq_backend.config import DetectorConfig
from daq_backend.formats import ImageMetadata
from daq_backend.ram_buffer import SLOT_META_BYTES, RingBuffer, SlotOverwritten
from daq_backend.stream.recv import ReceiverBusy, StreamReceiver
from daq_backend.stream.send import StreamSender
from daq_backend.stream.wire import HEADER_BYTES, Kind, StreamHeader, WireError
from daq_backend.testing import wait_for
from daq_backend.testing.stream import (
    Host,
    MetadataWatcher,
    Producer,
    expected_image,
    make_config,
    receiver_alive,
    write_file,
)
from daq_backend.writer import layout


@dataclass
class Rig:
    config: DetectorConfig
    a: Host
    b: Host
    producer: Producer
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def start_sender(self, address: str = "tcp://127.0.0.1:*", **kwargs: object) -> StreamSender:
        sender = StreamSender(self.config, address, **kwargs)  # type: ignore[arg-type]
        thread = sender.start()

        def stop() -> None:
            sender.stop()
            thread.join(timeout=30)
            sender.close()

        self.cleanups.append(stop)
        return sender

    def watcher(self) -> MetadataWatcher:
        watcher = self.b.watcher()
        self.cleanups.append(watcher.close)
        return watcher

    def ring_b(self) -> RingBuffer:
        ring = self.b.attach_ring()
        self.cleanups.append(ring.close)
        return ring

    def warm_up(self, watcher: MetadataWatcher, next_id: int) -> int:
        """Publish until B republishes something new: the whole path, including the test's SUB on
        B, is connected from here on. Returns the next free id."""
        seen = watcher.drain()
        deadline_ids = next_id + 2000
        while next_id < deadline_ids:
            self.producer.publish(next_id)
            next_id += 1
            try:
                wait_for(lambda: watcher.drain() > seen, "B to republish", 0.5)
                return next_id
            except AssertionError:
                continue
        raise AssertionError(f"B never republished anything:\n{self.b.tail_log()}")

    def publish_paced(self, ids: list[int], window: int = 16) -> None:
        """Publish while keeping at most ``window`` images unsettled on B (never laps a ring)."""
        for image_id in ids:
            wait_for(
                lambda: len(self.producer.order) - self.b.state().get("settled_upto", 0) <= window,
                f"B to settle images (state {self.b.state()})",
            )
            self.producer.publish(image_id)

    def settled(self, sender: StreamSender) -> dict[str, int]:
        total = len(self.producer.order)
        wait_for(lambda: sender.stats.images == total, "the sender to take every image")
        return wait_for(
            lambda: (s := self.b.state()).get("settled_upto") == sender.stats.last_seq and s,
            f"B to settle everything (sender {sender.counters()}, B {self.b.state()})",
        )


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    config = make_config()
    a, b = Host(tmp_path, config, "a"), Host(tmp_path, config, "b")
    monkeypatch.setenv("STD_DAQ_IPC_DIR", str(a.dir))
    monkeypatch.setenv("STD_DAQ_SHM_PREFIX", a.prefix)
    producer = Producer(config)
    rig = Rig(config, a, b, producer)
    yield rig
    for cleanup in reversed(rig.cleanups):
        cleanup()
    b.cleanup()
    producer.close()
    a.cleanup()


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, our address, its address)."""
    name = f"sdq{uuid.uuid4().hex[:6]}"
    here, there = f"{name}a", f"{name}b"
    net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    base = 4 * random.randint(0, 63)  # a /30 of its own
    addr_here, addr_there = f"{net}.{base + 1}", f"{net}.{base + 2}"
    made = _ip("netns", "add", name)
    if made.returncode:
        if "not permitted" in made.stderr.lower() or "permission" in made.stderr.lower():
            pytest.skip(f"creating a network namespace is not permitted here: {made.stderr.strip()}")
        raise AssertionError(f"ip netns add failed: {made.stderr}")
    try:
        for args in (
            ("link", "add", here, "type", "veth", "peer", "name", there),
            ("link", "set", there, "netns", name),
            ("addr", "add", f"{addr_here}/30", "dev", here),
            ("link", "set", here, "up"),
            ("netns", "exec", name, "ip", "addr", "add", f"{addr_there}/30", "dev", there),
            ("netns", "exec", name, "ip", "link", "set", there, "up"),
            ("netns", "exec", name, "ip", "link", "set", "lo", "up"),
        ):
            done = _ip(*args)
            assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
        yield name, addr_here, addr_there
    finally:
        _ip("netns", "del", name)
        _ip("link", "del", here)


# -- replication is transparent -------------------------------------------------------------------


@pytest.mark.parametrize("network", ["loopback", "netns"])
def test_replica_is_identical_image_for_image(rig: Rig, network: str, request: pytest.FixtureRequest) -> None:
    namespace = None
    bind = "tcp://127.0.0.1:*"
    if network == "netns":
        namespace, addr_here, _ = request.getfixturevalue("netns")
        bind = f"tcp://{addr_here}:*"
    sender = rig.start_sender(bind)
    proc = rig.b.start_receiver(sender.address, netns=namespace)
    wait_for(lambda: receiver_alive(proc, rig.b) or sender.stats.peers == 1, "the receiver to connect")
    watcher = rig.watcher()
    next_id = rig.warm_up(watcher, 1000)
    first_on_b = watcher.ids[0]
    # Ids with gaps and statuses that vary, as a real assembler produces them.
    ids = [next_id + 2 * i for i in range(60)]  # gaps, within one ring length for the writer
    rig.publish_paced(ids)
    state = rig.settled(sender)

    a_stream = rig.producer.order[rig.producer.order.index(first_on_b):]
    wait_for(lambda: watcher.drain() >= len(a_stream), "B's metadata stream")
    assert watcher.messages == [rig.producer.metadata[i] for i in a_stream]
    ring_b, ring_a = rig.ring_b(), rig.producer.ring
    for image_id in a_stream:
        assert ring_b.read(image_id) == ring_a.read(image_id), f"image {image_id} differs on B"
        assert ring_b.meta(image_id, SLOT_META_BYTES) == ring_a.meta(image_id, SLOT_META_BYTES)
    assert state["lost"] == state["torn"] == state["lapped"] == state["rejected"] == 0
    assert state["published"] == state["received"] >= len(ids)
    assert sender.stats.verified == sender.stats.sent and sender.stats.torn == 0

    # The real writer agent + h5 writer, run on each host, write the same file from the ring.
    files = {}
    for host in (rig.a, rig.b):
        files[host] = host.dir / "run.h5"
        done = write_file(host, files[host], ids[0], len(ids))
        assert done.returncode == 0, f"writer on {host.dir.name}: {done.stdout}{done.stderr[-3000:]}"
    with h5py.File(files[rig.a], "r") as fa, h5py.File(files[rig.b], "r") as fb:
        assert list(fa[layout.IMAGE_ID][()]) == ids
        for name in (layout.DATA, layout.IMAGE_ID, layout.STATUS, layout.N_MISSING_PACKETS):
            assert np.array_equal(fa[name][()], fb[name][()]), f"{name} differs between the hosts' files"

    # A clean stop removes B's ring and state; only a crash leaves them for recovery.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, rig.b.tail_log()
    for name in rig.b.shm_names():
        assert not (Path("/dev/shm") / name).exists(), f"/dev/shm/{name} left behind"


def test_kill_and_restart_loses_exactly_the_outage(rig: Rig) -> None:
    sender = rig.start_sender()
    proc = rig.b.start_receiver(sender.address)
    wait_for(lambda: receiver_alive(proc, rig.b) or sender.stats.peers == 1, "the receiver to connect")
    watcher = rig.watcher()
    next_id = rig.warm_up(watcher, 1)
    rig.publish_paced(list(range(next_id, next_id + 20)))
    next_id += 20
    before = rig.settled(sender)
    assert before["lost"] == 0
    ring_b = rig.ring_b()

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    wait_for(lambda: sender.stats.peers == 0, "the sender to notice the receiver is gone")
    dropped_before = sender.stats.dropped_no_receiver
    outage = list(range(next_id, next_id + 15))
    next_id += 15
    for image_id in outage:
        rig.producer.publish(image_id)
    wait_for(lambda: sender.stats.images == len(rig.producer.order), "the sender to take the outage images")
    assert sender.stats.dropped_no_receiver - dropped_before == len(outage)
    assert sender.status().startswith("no receiver connected")

    proc = rig.b.start_receiver(sender.address)
    wait_for(lambda: receiver_alive(proc, rig.b) or sender.stats.peers == 1, "the receiver to reconnect")
    seen_before_restart = watcher.drain()
    next_id = rig.warm_up(watcher, next_id)
    after = list(range(next_id, next_id + 20))
    rig.publish_paced(after)
    state = rig.settled(sender)

    assert state["lost"] == len(outage), state
    assert state["restarts"] == 1
    new_images = len(rig.producer.order) - before["settled_upto"]
    assert state["published"] == before["published"] + new_images - len(outage)
    first_on_b = watcher.ids[0]
    for image_id in rig.producer.order[rig.producer.order.index(first_on_b):]:
        if image_id in outage:
            assert not ring_b.holds(image_id), f"outage image {image_id} is on B"
        else:
            # The restarted receiver took over the crashed one's ring: the old mapping still works.
            assert ring_b.read(image_id) == rig.producer.ring.read(image_id), f"image {image_id} differs"
    wait_for(lambda: watcher.drain() and set(after) <= set(watcher.ids[seen_before_restart:]),
             "B to republish the images after the restart")
    assert not set(watcher.ids) & set(outage)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, rig.b.tail_log()


def test_slow_receiver_is_reported_never_corrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(slots=8)  # a small ring, so the producer laps queued images quickly
    a, b = Host(tmp_path, config, "a"), Host(tmp_path, config, "b")
    monkeypatch.setenv("STD_DAQ_IPC_DIR", str(a.dir))
    monkeypatch.setenv("STD_DAQ_SHM_PREFIX", a.prefix)
    rig = Rig(config, a, b, Producer(config))
    try:
        sender = rig.start_sender(sndhwm=4)
        proc = b.start_receiver(sender.address)
        wait_for(lambda: receiver_alive(proc, b) or sender.stats.peers == 1, "the receiver to connect")
        watcher = rig.watcher()
        next_id = rig.warm_up(watcher, 1)
        rig.publish_paced(list(range(next_id, next_id + 10)), window=2)
        next_id += 10
        s0 = rig.settled(sender)
        sender0 = sender.counters()

        os.kill(proc.pid, signal.SIGSTOP)  # B stops reading; TCP and the send queue fill up
        statuses = set()
        while sender.stats.dropped_by_hwm < 50:
            assert next_id < 100_000, "the sender never hit its high-water mark"
            rig.producer.publish(next_id)
            next_id += 1
            statuses.add(sender.status().split(":")[0])
        assert "receiver slow" in statuses
        os.kill(proc.pid, signal.SIGCONT)
        s1 = rig.settled(sender)
        sender1 = sender.counters()

        def delta(key: str) -> int:
            return s1[key] - s0[key]

        outcomes = ("published", "lost", "torn", "lapped", "overrun", "rejected")
        assert sum(delta(k) for k in outcomes) == s1["settled_upto"] - s0["settled_upto"], (s0, s1)
        sent_lapped = sender1["lapped"] - sender0["lapped"]
        dropped = sender1["dropped_by_hwm"] - sender0["dropped_by_hwm"]
        assert delta("lost") == dropped + sent_lapped - delta("lapped")
        # Queued images were lapped at A; B discards each one, as torn or, if B's own small ring
        # needed the slot again before the verdict arrived, as overrun.
        torn_at_a = sender1["torn"] - sender0["torn"]
        assert torn_at_a >= 1
        assert delta("torn") <= torn_at_a <= delta("torn") + delta("overrun")
        # After the stall B replicates normally again: a few paced images are published intact.
        rig.publish_paced(list(range(next_id, next_id + 3)), window=2)
        next_id += 3
        rig.settled(sender)
        # Whatever B published is exactly what the producer wrote under that id.
        ring_b = rig.ring_b()
        watcher.drain()
        checked = 0
        for raw in watcher.messages:
            meta = ImageMetadata.unpack(raw)
            assert raw == rig.producer.metadata[meta.id]
            try:
                data = ring_b.read(meta.id)
            except SlotOverwritten:
                continue
            image = np.frombuffer(data, dtype=np.uint16).reshape(config.image_shape)
            assert np.array_equal(image, expected_image(config, meta.id)), f"image {meta.id} corrupted"
            checked += 1
        assert checked >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, b.tail_log()
    finally:
        for cleanup in reversed(rig.cleanups):
            cleanup()
        b.cleanup()
        rig.producer.close()


# -- bad input ------------------------------------------------------------------------------------


def test_receiver_with_other_geometry_rejects_and_says_why(rig: Rig) -> None:
    sender = rig.start_sender()
    other = make_config(rig.config.detector_name, height=128, width=264)
    with rig.b.env():
        receiver = StreamReceiver(other, sender.address)
    thread = receiver.start()
    try:
        wait_for(lambda: sender.stats.peers == 1, "the receiver to connect")
        next_id = 1
        while receiver.state.get("rejected") < 3:
            assert next_id < 10_000
            rig.producer.publish(next_id)
            next_id += 1
            wait_for(lambda: sender.stats.images == len(rig.producer.order), "the sender")
        status = receiver.status()
        assert status.startswith("error:") and "configs differ" in status and "128x264" in status
        assert receiver.state.get("published") == 0
    finally:
        receiver.stop()
        thread.join(timeout=30)
        receiver.close()


def test_second_receiver_on_one_host_is_refused(rig: Rig) -> None:
    with rig.b.env():
        first = StreamReceiver(rig.config, "tcp://127.0.0.1:1")
        try:
            with pytest.raises(ReceiverBusy, match=f"pid {os.getpid()}"):
                StreamReceiver(rig.config, "tcp://127.0.0.1:1")
        finally:
            first.close()


def test_garbage_on_the_wire_is_counted_and_survived(rig: Rig) -> None:
    with rig.b.env():
        receiver = StreamReceiver(rig.config, "tcp://127.0.0.1:*", bind=True)
    thread = receiver.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.connect(receiver.address)
        push.send_multipart([b"not a stream header", b"x"])
        push.send_multipart([StreamHeader(Kind.IMAGE, 7, 1).pack()])  # image without its parts
        wait_for(lambda: receiver.state.get("bad_messages") == 2, "both bad messages to be counted")
        assert thread.is_alive()
    finally:
        push.close()
        receiver.stop()
        thread.join(timeout=30)
        receiver.close()
    with pytest.raises(WireError, match="bad magic"):
        StreamHeader.unpack(b"XXXX" + bytes(HEADER_BYTES - 4))
    with pytest.raises(WireError, match="expected 32 bytes"):
        StreamHeader.unpack(b"short")


def test_sender_reports_no_receiver_and_survives_bad_metadata(rig: Rig) -> None:
    sender = rig.start_sender()
    rig.producer.pub.send(b"too short")
    rig.producer.publish(1)
    wait_for(lambda: sender.stats.images == 1 and sender.stats.bad_messages == 1
             and sender.stats.dropped_no_receiver == 1, "the sender to count the image it could not send")
    assert sender.status() == "no receiver connected (1 images dropped)"
    with pytest.raises(ValueError, match="cannot bind 'tcp://127.0.0.1:nonsense'"):
        StreamSender(rig.config, "tcp://127.0.0.1:nonsense")
