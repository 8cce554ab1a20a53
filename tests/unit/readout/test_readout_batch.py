"""The ``recvmmsg`` batch path of the module receiver gives exactly what the per-packet path gives.

Every scenario's datagrams are queued in the receiver's socket before it starts, so the batch path
sees full batches (and runs cut at batch boundaries), then the frames it announced, their ring slots
and every counter are compared with a per-packet receiver fed the same datagrams. Real UDP over
127.0.0.1 throughout.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from daq_backend import ipc
from daq_backend.config import DetectorConfig, DetectorType
from daq_backend.detectors import DetectorLayout, layout_for
from daq_backend.formats import ModuleFrame
from daq_backend.ram_buffer import RingBuffer
from daq_backend.readout import mmsg
from daq_backend.readout.receiver import COALESCE, ModuleReceiver, default_coalesce
from daq_backend.simulator.sender import DetectorSimulator
from daq_backend.testing import EIGER_HALF_POSITIONS, UdpSender, make_config, shm_segments, wait_for

needs_recvmmsg = pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg on this platform")

#: (recv_batch, min_fast_run): per packet; default batches; tiny batches whose runs the fast path
#: takes from two packets on, so runs are cut at many batch boundaries
PER_PACKET = (0, None)
BATCH_MODES = {"batch64": (64, None), "batch5-run2": (5, 2)}


@dataclass
class Outcome:
    """What a receiver produced: announced frames in order, their slots, its counters."""

    frames: list[ModuleFrame]
    slots: dict[int, bytes]
    stats: dict[str, int]
    fast_packets: int


def frame_data(layout: DetectorLayout, frame_number: int) -> bytes:
    """A module frame whose 16-bit words depend on frame and position (misplaced packets show)."""
    words = (np.arange(layout.frame_nbytes // 2, dtype=np.uint32) * 7 + frame_number * 131) % 65000 + 1
    return words.astype("<u2").tobytes()


def datagrams(layout: DetectorLayout, frame_number: int, pulse_id: int = 0) -> list[bytes]:
    """Module 0's datagrams of one frame (SLS detectors: ``daq_rec`` = frame number + 40)."""
    fields = {} if layout.config.detector_type is DetectorType.GIGAFROST else {"daq_rec": frame_number + 40}
    return layout.encode_datagrams(0, frame_data(layout, frame_number), frame_number, pulse_id, **fields)


def receive(config: DetectorConfig, send: Callable[[], int], recv_batch: int,
            min_fast_run: int | None = None) -> Outcome:
    """Queue what ``send`` sends (it returns how many datagrams), then let one receiver take it all."""
    receiver = ModuleReceiver(config, 0, stats_interval=0.2, idle_flush=60.0, late_window=60.0,
                              recv_batch=recv_batch)
    ring = RingBuffer.attach(ipc.frame_ring_name(config.detector_name, 0), timeout=5)
    try:
        if min_fast_run is not None:
            receiver.min_fast_run = min_fast_run
        n_sent = send()
        if receiver.rcvbuf < n_sent * receiver.layout.max_datagram:
            pytest.skip(f"a socket buffer of {receiver.rcvbuf} bytes cannot queue the test's datagrams "
                        "(root or a larger net.core.rmem_max needed)")
        thread = receiver.start()
        wait_for(lambda: receiver.stats.packets == n_sent, f"{n_sent} datagrams ({receiver.stats})")
        receiver.stop()  # flushes the open frame, as the idle flush would
        thread.join(30)
        assert not thread.is_alive()
        assert ring.committed == receiver.stats.frames, "a flushed frame was not committed"
        frames = [ModuleFrame.unpack(ring.meta(image_id, ModuleFrame.FORMAT.size))
                  for image_id in ring.logged_ids(0, ring.committed).tolist()]
        slots = {f.id: ring.read(f.id) for f in frames}
        return Outcome(frames, slots, receiver.stats.snapshot(), receiver.n_fast_packets)
    finally:
        ring.close()
        receiver.close()


def sending(config: DetectorConfig, dgrams: list[bytes]) -> Callable[[], int]:
    """A ``send`` for :func:`receive`: these datagrams to module 0's port."""

    def send() -> int:
        sender = UdpSender(config)
        try:
            sender.send(0, dgrams)
        finally:
            sender.close()
        return len(dgrams)

    return send


def compare_paths(config: DetectorConfig, scenario: Callable[[DetectorLayout], list[bytes]]) -> Outcome:
    """Run ``scenario``'s datagrams through the per-packet path and every batch mode; all must agree.
    Returns the per-packet outcome so a test can check what the scenario was meant to provoke."""
    send = sending(config, scenario(layout_for(config)))
    reference = receive(config, send, *PER_PACKET)
    assert reference.fast_packets == 0
    for name, mode in BATCH_MODES.items():
        got = receive(config, send, *mode)
        assert got.frames == reference.frames, name
        assert got.stats == reference.stats, name
        assert got.slots.keys() == reference.slots.keys(), name
        for image_id, data in reference.slots.items():
            assert got.slots[image_id] == data, f"{name}: slot of frame {image_id} differs"
    return reference


@pytest.fixture
def jf(ipc_env: str) -> Iterator[DetectorConfig]:
    config = make_config("jungfrau", frame_ring_slots=32)
    yield config
    assert shm_segments(config.detector_name) == []


# -- scenarios ---------------------------------------------------------------------------------


def clean(layout: DetectorLayout) -> list[bytes]:
    return [d for f in range(1, 6) for d in datagrams(layout, f)]


def dropped(layout: DetectorLayout) -> list[bytes]:
    lost = {1: {0, 5, 6, 127}, 2: set(range(64, 101)), 5: {127}}
    out = []
    for f in (1, 2, 4, 5):  # frame 3 lost entirely: counted by frames_skipped
        out += [d for k, d in enumerate(datagrams(layout, f)) if k not in lost.get(f, set())]
    return out


def duplicates(layout: DetectorLayout) -> list[bytes]:
    d1, d2 = datagrams(layout, 1), datagrams(layout, 2)
    out = d1[:11] + [d1[10]] + d1[11:50] + [d1[20], d1[20]] + d1[50:100]
    out += d1[60:80]  # a block sent again: a clean run of packets already received
    out += d1[100:] + [d1[127], d1[0]]  # the last two after frame 1 was flushed complete
    out += d2 + [d2[0]] + d2[:30]  # a block of a flushed frame
    return out


def garbage(layout: DetectorLayout) -> list[bytes]:
    good = datagrams(layout, 1) + datagrams(layout, 2)
    rng = random.Random(3)
    size = layout.max_datagram
    bad: list[bytes] = [
        b"",
        b"\x00",
        good[3][:-1],
        good[3] + b"\x00",
        bytes(rng.getrandbits(8) for _ in range(2 * size)),  # oversize
        bytes(rng.getrandbits(8) for _ in range(100)),
    ]
    index_out_of_range = bytearray(good[0])
    index_out_of_range[12:16] = (500).to_bytes(4, "little")
    nan_bunch = bytearray(good[0])
    nan_bunch[16:24] = np.array([np.nan]).tobytes()
    negative_bunch = bytearray(good[5])
    negative_bunch[16:24] = np.array([-1.0]).tobytes()
    id_beyond_ring = bytearray(good[0])
    id_beyond_ring[0:8] = b"\xff" * 8
    bad += [bytes(index_out_of_range), bytes(nan_bunch), bytes(negative_bunch), bytes(id_beyond_ring)]
    out: list[bytes] = []
    for i, d in enumerate(good):
        out.append(d)
        if i % 5 == 4:
            out.append(bad[(i // 5) % len(bad)])
        if i == 200:  # a whole run of packets of a frame whose id no ring slot can hold
            for k in range(10):
                beyond = bytearray(good[k])
                beyond[0:8] = b"\xff" * 8
                out.append(bytes(beyond))
    return out


def out_of_order(layout: DetectorLayout) -> list[bytes]:
    d = {f: datagrams(layout, f) for f in range(1, 6)}
    shuffled = list(d[1])
    random.Random(7).shuffle(shuffled)
    reversed_middle = [d[2][0], *d[2][126:0:-1], d[2][127]]  # as the simulator's out_of_order
    reversed_middle.remove(d[2][9])
    straggler = d[3][:50] + [d[2][9]] + d[3][50:]  # frame 2's packet 9 after frame 3 began: late
    swapped_pairs = [d[4][k ^ 1] for k in range(128)]
    swapped_halves = d[5][64:] + d[5][:64]  # a clean run below the highest packet received
    return shuffled + reversed_middle + straggler + swapped_pairs + swapped_halves


def key_changes(layout: DetectorLayout) -> list[bytes]:
    d = {f: datagrams(layout, f) for f in range(1, 6)}
    out = d[1][:100] + d[2] + d[1][100:]  # the rest of frame 1 arrives late
    out += [p for pair in zip(d[3][:64], d[4][:64], strict=True) for p in pair]  # alternating frames
    out += d[5][:70] + d[4][64:] + d[5][70:]
    return out


def pulse_ids(layout: DetectorLayout) -> list[bytes]:
    """Jungfrau image ids from pulse ids; 5003 and 5004 share a frame number (only the pulse id, the
    header's bunch id, tells them apart). 5003 lacks its first half and the batch of 64 datagrams
    that holds its end also holds the start of 5004, whose packets must not land in 5003."""
    d = {p: datagrams(layout, f, p) for f, p in [(1, 5001), (2, 5002), (3, 5003), (3, 5004), (5, 5005)]}
    return d[5001] + d[5002][:-10] + d[5003][64:] + d[5004] + d[5005][:-10] + d[5005][-5:]


#: counters each scenario must provoke (so that none passes by provoking nothing)
PROVOKES: dict[str, dict[str, int]] = {
    "clean": {"frames": 5, "frames_incomplete": 0, "bad_datagrams": 0},
    "dropped": {"frames": 4, "frames_incomplete": 3, "missing_packets": 42, "frames_skipped": 1},
    "duplicates": {"frames": 2, "frames_incomplete": 0, "duplicate_packets": 56},
    "garbage": {"frames": 2, "frames_incomplete": 0, "bad_datagrams": 256 // 5 + 10},
    "out_of_order": {"frames": 5, "missing_packets": 1, "late_packets": 1, "out_of_order_packets": 375},
    "key_changes": {"frames": 5, "frames_incomplete": 3, "missing_packets": 219, "late_packets": 155},
    "pulse_ids": {"frames": 5, "missing_packets": 64 + 10 + 5, "last_frame_id": 5005},
}

SCENARIOS = {
    "clean": clean, "dropped": dropped, "duplicates": duplicates, "garbage": garbage,
    "out_of_order": out_of_order, "key_changes": key_changes, "pulse_ids": pulse_ids,
}


# -- tests -------------------------------------------------------------------------------------


@needs_recvmmsg
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_batch_path_equals_per_packet_path(jf: DetectorConfig, name: str) -> None:
    reference = compare_paths(jf, SCENARIOS[name])
    st = reference.stats
    provoked = {k: st[k] for k in PROVOKES[name]}
    assert provoked == PROVOKES[name]


@needs_recvmmsg
def test_clean_frames_take_the_fast_path_and_land_intact(jf: DetectorConfig) -> None:
    layout = layout_for(jf)
    got = receive(jf, sending(jf, clean(layout)), 64)
    want = [(f, 128, f + 40) for f in range(1, 6)]
    assert [(f.id, f.n_recv_packets, f.daq_rec) for f in got.frames] == want
    for f in range(1, 6):
        assert got.slots[f] == frame_data(layout, f)
    # every packet of a clean stream in full batches, but for the first half of the first frame: a
    # receiver stages packets until half a frame of one numbering has arrived (readout.window)
    assert got.fast_packets == 5 * 128 - 64


@needs_recvmmsg
def test_simulator_faults_give_the_same_result_on_both_paths(jf: DetectorConfig) -> None:
    def send() -> int:
        with DetectorSimulator(
            jf, n_images=8, drop_packets=[(2, 0, 5), (2, 0, 6), (6, 0, 127)], drop_frames=[(4, 0)],
            duplicate=[(3, 0, 7), (5, 0, 0)], garbage_every=9, out_of_order=[(5, 0), (7, 0)],
        ) as sim:
            sim.run()
            return sim.n_sent_packets + sim.n_garbage

    reference = receive(jf, send, *PER_PACKET)
    for name, mode in BATCH_MODES.items():
        got = receive(jf, send, *mode)
        assert (got.frames, got.stats) == (reference.frames, reference.stats), name
        assert got.slots == reference.slots, name
        assert got.fast_packets > 0
    st = reference.stats
    counts = (st["frames"], st["frames_skipped"], st["missing_packets"], st["duplicate_packets"])
    assert counts == (7, 1, 3, 2)
    assert st["bad_datagrams"] > 0 and st["out_of_order_packets"] > 0


@needs_recvmmsg
@pytest.mark.parametrize("detector_type", ["eiger", "gigafrost"])
def test_other_detectors_agree_on_both_paths(ipc_env: str, detector_type: str) -> None:
    """Eiger takes the SLS fast path (bunch id not part of its key); GigaFRoST's batches are placed
    packet by packet from the staging buffer."""
    if detector_type == "eiger":
        config = make_config("eiger", n_modules=2, image_pixel_height=514, image_pixel_width=514,
                             module_positions=EIGER_HALF_POSITIONS, frame_ring_slots=32)
    else:
        # 7 packets per frame, the last one shorter
        config = make_config("gigafrost", n_modules=8, image_pixel_height=512, image_pixel_width=480,
                             frame_ring_slots=32)

    def scenario(layout: DetectorLayout) -> list[bytes]:
        ppf = layout.packets_per_frame
        d = {f: datagrams(layout, f) for f in range(1, 6)}
        out = d[1] + [b"\x00" * 17] + d[2][: ppf // 2] + [d[2][1]] + d[2][ppf // 2 :]
        out += d[3][:-2] + d[4][::-1] + [b"\xa5" * (layout.max_datagram + 100)] + d[5][1:]
        return out

    reference = compare_paths(config, scenario)
    st = reference.stats
    assert (st["frames"], st["bad_datagrams"], st["duplicate_packets"], st["missing_packets"]) == (5, 2, 1, 3)


def test_without_recvmmsg_the_receiver_takes_one_datagram_per_call(
    jf: DetectorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mmsg, "_RECVMMSG", None)
    assert not mmsg.available()
    with pytest.raises(OSError):
        mmsg.RecvBatch(8, 100)
    layout = layout_for(jf)
    got = receive(jf, sending(jf, garbage(layout)), 64)  # asks for batches, gets the per-packet path
    assert got.fast_packets == 0
    assert [(f.id, f.n_recv_packets) for f in got.frames] == [(1, 128), (2, 128)]
    assert got.slots == {1: frame_data(layout, 1), 2: frame_data(layout, 2)}
    assert got.stats["bad_datagrams"] == PROVOKES["garbage"]["bad_datagrams"]


@needs_recvmmsg
def test_a_receive_error_is_logged_and_receiving_goes_on(
    jf: DetectorConfig, caplog: pytest.LogCaptureFixture
) -> None:
    real_recv = mmsg.RecvBatch.recv
    failed = []

    def flaky(self: mmsg.RecvBatch, fd: int) -> int:
        if not failed:
            failed.append(True)
            raise OSError(errno.ECONNREFUSED, "recvmmsg: Connection refused")
        return real_recv(self, fd)

    with caplog.at_level(logging.WARNING, logger="daq_backend.readout.receiver"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mmsg.RecvBatch, "recv", flaky)
            got = receive(jf, sending(jf, clean(layout_for(jf))[:256]), 64)
    assert failed and "receive error" in caplog.text
    assert [(f.id, f.n_recv_packets) for f in got.frames] == [(1, 128), (2, 128)]


def test_the_receiver_waits_for_batches_only_with_room_in_the_socket_buffer() -> None:
    frame = 128 * 8240
    assert default_coalesce(100 * frame, frame) == COALESCE > 0  # what the receiver asks for
    assert default_coalesce(4 * 1024 * 1024, frame) == COALESCE  # a 4 MiB rmem_max
    assert default_coalesce(212992, frame) == 0.0  # Linux' stock rmem_max: drain at once


# -- the recvmmsg wrapper on its own -----------------------------------------------------------


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    yield rx, tx
    rx.close()
    tx.close()


@needs_recvmmsg
def test_recv_batch_fills_rows_and_lengths(udp_pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = udp_pair
    batch = mmsg.RecvBatch(4, 101)
    assert batch.recv(rx.fileno()) == 0  # empty socket: no error, no wait
    sent = [bytes([i]) * n for i, n in enumerate([1, 100, 101, 500, 0, 7])]
    for d in sent:
        tx.send(d)
    assert batch.recv(rx.fileno()) == 4
    assert batch.lengths[:4].tolist() == [1, 100, 101, 101]  # 500 bytes truncated to the row size
    for i, d in enumerate(sent[:4]):
        assert bytes(batch.buffer[i, : batch.lengths[i]]) == d[:101]
    assert batch.recv(rx.fileno()) == 2
    assert batch.lengths[:2].tolist() == [0, 7]
    assert bytes(batch.buffer[1, :7]) == sent[5]
    assert batch.recv(rx.fileno()) == 0
    assert batch.buffer.ctypes.data % mmsg.ROW_ALIGN == 0 and batch.buffer.strides[0] % mmsg.ROW_ALIGN == 0


@needs_recvmmsg
def test_recv_batch_reports_socket_errors_and_goes_on() -> None:
    """An ICMP port-unreachable is reported once, as ``recv_into`` would; the next call receives."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        s.connect(dead)
        s.send(b"x")  # to a port nobody listens on: the kernel queues ECONNREFUSED on s
        batch = mmsg.RecvBatch(2, 16)
        with pytest.raises(OSError) as info:
            wait_for(lambda: batch.recv(s.fileno()) or None, "the ICMP error", 10)
        assert info.value.errno == errno.ECONNREFUSED
        assert batch.recv(s.fileno()) == 0


def test_recv_batch_rejects_bad_sizes() -> None:
    if not mmsg.available():
        pytest.skip("no recvmmsg on this platform")
    with pytest.raises(ValueError):
        mmsg.RecvBatch(0, 100)
    with pytest.raises(ValueError):
        mmsg.RecvBatch(mmsg.MAX_VLEN + 1, 100)
    with pytest.raises(ValueError):
        mmsg.RecvBatch(4, 0)
