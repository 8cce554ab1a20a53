"""One module receiver over real UDP: frames, lost packets (zeroed, never stale), bad input."""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from daq_backend.formats import ModuleFrame
from daq_backend.readout.receiver import ModuleReceiver, set_receive_buffer
from daq_backend.testing import ReceiverHarness, make_config, shm_segments


@pytest.fixture
def jf(ipc_env: str) -> Iterator[ReceiverHarness]:
    # a long late window: a duplicate must be recognised even if this busy machine delays it
    h = ReceiverHarness(make_config("jungfrau", frame_ring_slots=4), idle_flush=0.3, late_window=60.0)
    yield h
    h.close()
    assert shm_segments(h.config.detector_name) == []


def test_complete_frames_land_in_their_slot_with_header_fields(jf: ReceiverHarness) -> None:
    for image_id in (1, 2, 3):
        jf.send(jf.datagrams(image_id, image_id, pulse_id=0, daq_rec=40 + image_id))
    for image_id in (1, 2, 3):
        f = jf.next_frame()
        got = (f.id, f.frame_index, f.n_recv_packets, f.module_id, f.daq_rec)
        assert got == (image_id, image_id, 128, 0, 40 + image_id)
        assert jf.slot(image_id) == jf.frame(image_id, image_id)
        assert ModuleFrame.unpack(jf.ring.meta(image_id, ModuleFrame.FORMAT.size)) == f
    st = jf.receiver.stats
    assert (st.frames, st.frames_incomplete, st.missing_packets, st.bad_datagrams) == (3, 0, 0, 0)


@pytest.mark.parametrize(
    "lost", [[0], [63], [127], [0, 5, 6, 127]], ids=["first", "middle", "last", "several"]
)
def test_lost_packets_are_counted_and_zeroed_never_stale(jf: ReceiverHarness, lost: list[int]) -> None:
    jf.send(jf.datagrams(1, 1))  # slot 1 now holds non-zero data of frame 1
    assert jf.next_frame().n_recv_packets == 128
    dgrams = jf.datagrams(5, 500)  # frame 5 reuses slot 1 (4 slots)
    jf.send([d for i, d in enumerate(dgrams) if i not in lost])
    jf.send(jf.datagrams(6, 600))  # the next frame flushes 5 even when its last packet is lost
    f5, f6 = jf.next_frame(), jf.next_frame()
    assert (f5.id, f5.n_recv_packets) == (5, 128 - len(lost))
    assert (f6.id, f6.n_recv_packets) == (6, 128)
    got = np.frombuffer(jf.slot(5), np.uint8).reshape(128, -1)
    want = np.frombuffer(jf.frame(5, 500), np.uint8).reshape(128, -1)
    for k in range(128):
        if k in lost:
            assert not got[k].any(), f"packet {k} was lost but its bytes are not zero"
        else:
            assert np.array_equal(got[k], want[k])
    assert jf.slot(6) == jf.frame(6, 600)
    assert jf.receiver.stats.missing_packets == len(lost)
    assert jf.receiver.stats.frames_incomplete == 1


def test_last_frame_missing_its_last_packet_is_flushed_when_idle(jf: ReceiverHarness) -> None:
    jf.send(jf.datagrams(9, 9)[:-1])
    f = jf.next_frame()
    assert (f.id, f.n_recv_packets) == (9, 127)
    assert not np.frombuffer(jf.slot(9), np.uint8)[127 * 8192 :].any()


def test_bad_datagrams_are_counted_and_do_not_disturb_frames(jf: ReceiverHarness) -> None:
    good = jf.datagrams(2, 2)
    rng = random.Random(1)
    bad = [
        b"",
        b"\x00",
        good[3][:-1],  # one byte short
        good[3] + b"\x00",  # one byte long
        bytes(rng.getrandbits(8) for _ in range(8240 * 2)),  # oversize garbage
        bytes(rng.getrandbits(8) for _ in range(100)),
    ]
    index_out_of_range = bytearray(good[0])
    index_out_of_range[12:16] = (500).to_bytes(4, "little")
    bad.append(bytes(index_out_of_range))
    nan_bunchid = bytearray(good[0])
    nan_bunchid[16:24] = np.array([np.nan]).tobytes()
    bad.append(bytes(nan_bunchid))
    id_beyond_ring = bytearray(good[0])  # frame number 2**64-1: no ring slot can hold id + 1
    id_beyond_ring[0:8] = b"\xff" * 8
    bad.append(bytes(id_beyond_ring))
    frame = good[:64] + bad + good[64:]
    jf.send(frame)
    f = jf.next_frame()
    assert (f.id, f.n_recv_packets) == (2, 128)
    assert jf.slot(2) == jf.frame(2, 2)
    assert jf.receiver.stats.bad_datagrams == len(bad)


def test_duplicate_and_reordered_packets_are_counted_and_placed(jf: ReceiverHarness) -> None:
    dgrams = jf.datagrams(3, 3)
    order = list(range(128))
    random.Random(7).shuffle(order)
    shuffled = [dgrams[i] for i in order]
    shuffled.insert(50, dgrams[order[10]])  # duplicate inside the frame
    jf.send(shuffled)
    f = jf.next_frame()
    assert (f.id, f.n_recv_packets) == (3, 128)
    assert jf.slot(3) == jf.frame(3, 3)
    jf.send([dgrams[127], dgrams[0]])  # duplicates arriving after the frame was flushed
    jf.send(jf.datagrams(4, 4))
    f4 = jf.next_frame()
    assert (f4.id, f4.n_recv_packets) == (4, 128)  # no second frame 3 in between
    st = jf.receiver.stats
    assert st.duplicate_packets == 3
    assert st.out_of_order_packets > 0
    assert st.frames == 2 and st.frames_incomplete == 0


def test_straggler_of_a_flushed_frame_is_late_not_a_new_frame(jf: ReceiverHarness) -> None:
    d1, d2 = jf.datagrams(1, 1), jf.datagrams(2, 2)
    jf.send(d1[:7] + d1[8:] + d2[:1] + d1[7:8] + d2[1:])
    f1, f2 = jf.next_frame(), jf.next_frame()
    assert (f1.id, f1.n_recv_packets, f2.id, f2.n_recv_packets) == (1, 127, 2, 128)
    assert jf.receiver.stats.late_packets == 1
    assert not np.frombuffer(jf.slot(1), np.uint8)[7 * 8192 : 8 * 8192].any()


def test_frames_lost_entirely_are_counted_from_the_frame_counter(jf: ReceiverHarness) -> None:
    for image_id in (1, 2, 5, 6):
        jf.send(jf.datagrams(image_id, image_id))
    assert [jf.next_frame().id for _ in range(4)] == [1, 2, 5, 6]
    assert jf.receiver.stats.frames_skipped == 2
    jf.receiver.late_window = 0.0  # (else id 1 again within 1 s would be taken for a straggler)
    jf.send(jf.datagrams(1, 1))  # a restarted frame counter is not a loss
    assert jf.next_frame().id == 1
    assert jf.receiver.stats.frames_skipped == 2


def test_receive_buffer_is_granted_as_asked() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert set_receive_buffer(s, 1 << 20) == 1 << 20


def test_too_small_receive_buffer_is_logged_with_the_fix(
    ipc_env: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("daq_backend.readout.receiver.set_receive_buffer", lambda sock, n: 4096)
    config = make_config("jungfrau")
    with caplog.at_level(logging.WARNING):
        receiver = ModuleReceiver(config, 0)
    receiver.close()
    assert "sysctl -w net.core.rmem_max=" in caplog.text


def test_port_in_use_is_named(ipc_env: str) -> None:
    config = make_config("jungfrau")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", config.udp_port(0)))
        with pytest.raises(OSError, match=f"module 0: cannot bind UDP 127.0.0.1:{config.udp_port(0)}"):
            ModuleReceiver(config, 0)
    assert shm_segments(config.detector_name) == []


def test_module_id_outside_detector_is_rejected(ipc_env: str) -> None:
    with pytest.raises(ValueError, match="module_id: 3"):
        ModuleReceiver(make_config("jungfrau", n_modules=2), 3)
