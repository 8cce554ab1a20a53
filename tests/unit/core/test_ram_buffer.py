"""Unit tests for the core modules: detector config, wire formats and the /dev/shm slot rings."""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from daq_backend import ram_buffer
from daq_backend.config import ConfigError, DetectorConfig, DetectorType, load_config, parse_config
from daq_backend.formats import (
    CODE_DTYPES,
    DTYPE_CODES,
    GF_HEADER_DTYPE,
    SLS_HEADER_DTYPE,
    Encoding,
    ImageMetadata,
    ImageStatus,
    ModuleFrame,
    StoreOp,
    StoreStream,
)
from daq_backend.ram_buffer import (
    MAGIC,
    RING_HEADER_BYTES,
    SLOT_META_BYTES,
    AttachedRing,
    RingBuffer,
    SlotOverwritten,
    shm_path,
)

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"

JUNGFRAU_1M = {
    "detector_name": "JF01T01V01",
    "detector_type": "jungfrau",
    "n_modules": 1,
    "bit_depth": 16,
    "image_pixel_height": 512,
    "image_pixel_width": 1024,
    "start_udp_port": 50100,
    "module_positions": {"0": [0, 0, 1023, 511]},
}


# ================================================================================================
# config
# ================================================================================================


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_seed_configs_load(path: Path) -> None:
    cfg = load_config(path)
    raw = json.loads(path.read_text())
    assert isinstance(cfg, DetectorConfig)
    assert cfg.detector_name == raw["detector_name"]
    assert cfg.detector_type.value == raw["detector_type"]
    assert cfg.image_shape == (raw["image_pixel_height"], raw["image_pixel_width"])
    assert set(cfg.module_positions) == {int(k) for k in raw["module_positions"]}


def test_parse_valid_config_and_derived_values() -> None:
    cfg = parse_config(JUNGFRAU_1M)
    assert cfg.detector_type is DetectorType.JUNGFRAU
    assert cfg.module_positions == {0: (0, 0, 1023, 511)}  # string keys become ints, lists tuples
    assert cfg.required_modules == (0,)
    assert cfg.image_shape == (512, 1024)
    assert cfg.image_dtype == "uint16"
    assert cfg.image_nbytes == 512 * 1024 * 2
    assert cfg.udp_port(0) == 50100
    assert not cfg.converted
    assert cfg.frame_ring_slots == 1000  # default


def test_eiger_32_bit_config_dtype() -> None:
    cfg = load_config(CONFIG_DIR / "eiger_500k_32.json")
    assert cfg.image_dtype == "uint32"
    assert cfg.image_nbytes == 514 * 514 * 4
    assert cfg.required_modules == (0, 1)
    assert cfg.udp_port(1) == 50401


def test_to_json_dict_round_trips() -> None:
    cfg = parse_config(JUNGFRAU_1M)
    data = cfg.to_json_dict()
    assert data["module_positions"] == {"0": [0, 0, 1023, 511]}
    assert json.loads(json.dumps(data)) == data
    assert parse_config(data) == cfg


def test_era_b_image_height_width_aliases() -> None:
    data = dict(JUNGFRAU_1M)
    data["image_height"] = data.pop("image_pixel_height")
    data["image_width"] = data.pop("image_pixel_width")
    cfg = parse_config(data)
    assert cfg.image_pixel_height == 512
    assert cfg.image_pixel_width == 1024
    assert cfg.image_shape == (512, 1024)


def test_new_names_win_over_era_b_names() -> None:
    data = {**JUNGFRAU_1M, "image_height": 99, "image_width": 77}
    cfg = parse_config(data)
    assert cfg.image_shape == (512, 1024)


def test_gf_is_an_alias_for_gigafrost() -> None:
    data = json.loads((CONFIG_DIR / "gigafrost_128x480.json").read_text())
    data["detector_type"] = "gf"
    cfg = parse_config(data)
    assert cfg.detector_type is DetectorType.GIGAFROST
    assert cfg.required_modules == tuple(range(8))


def test_missing_required_field_is_named() -> None:
    data = dict(JUNGFRAU_1M)
    del data["start_udp_port"]
    with pytest.raises(ConfigError, match=r"start_udp_port: missing \(required\)"):
        parse_config(data)


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"n_modules: .*valid integer"):
        parse_config({**JUNGFRAU_1M, "n_modules": "four"})


def test_unknown_detector_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"detector_type: .*'jungfrau', 'eiger' or 'gigafrost'"):
        parse_config({**JUNGFRAU_1M, "detector_type": "pilatus"})


def test_bit_depth_not_allowed() -> None:
    with pytest.raises(ConfigError, match=r"bit_depth: .*8, 16 or 32"):
        parse_config({**JUNGFRAU_1M, "bit_depth": 12})


def test_jungfrau_needs_16_bit() -> None:
    with pytest.raises(ConfigError, match=r"bit_depth: jungfrau sends 16-bit pixels, got 32"):
        parse_config({**JUNGFRAU_1M, "bit_depth": 32})


def test_module_position_outside_module_range() -> None:
    data = {**JUNGFRAU_1M, "module_positions": {"3": [0, 0, 1023, 511]}}
    with pytest.raises(ConfigError, match=r"module_positions: module 3 is outside 0\.\.0"):
        parse_config(data)


def test_module_box_outside_image() -> None:
    data = {**JUNGFRAU_1M, "module_positions": {"0": [1, 0, 1024, 511]}}
    match = r"module_positions\[0\]: end_x=1024 lies outside the 512x1024 image"
    with pytest.raises(ConfigError, match=match):
        parse_config(data)


def test_module_box_of_wrong_size() -> None:
    data = {**JUNGFRAU_1M, "module_positions": {"0": [0, 0, 1022, 511]}}
    with pytest.raises(ConfigError, match=r"module_positions\[0\]: box is 1023x512 px.*1024x512"):
        parse_config(data)


def test_gigafrost_needs_8_modules() -> None:
    data = json.loads((CONFIG_DIR / "gigafrost_128x480.json").read_text())
    with pytest.raises(ConfigError, match=r"n_modules: gigafrost streams over 8 links, got 4"):
        parse_config({**data, "n_modules": 4})


def test_eiger_requires_module_positions() -> None:
    data = json.loads((CONFIG_DIR / "eiger_500k_16.json").read_text())
    with pytest.raises(ConfigError, match=r"module_positions: required for eiger"):
        parse_config({**data, "module_positions": {}})


def test_parse_config_rejects_non_object() -> None:
    with pytest.raises(ConfigError, match=r"config: expected a JSON object, got list"):
        parse_config([JUNGFRAU_1M])  # type: ignore[arg-type]


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"cannot read detector config") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"detector_name": ')
    with pytest.raises(ConfigError, match=r"not valid JSON") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_validates_content(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**JUNGFRAU_1M, "bit_depth": 12}))
    with pytest.raises(ConfigError, match=r"bit_depth"):
        load_config(str(path))


# ================================================================================================
# formats
# ================================================================================================


def test_module_frame_packs_to_54_bytes_and_round_trips() -> None:
    frame = ModuleFrame(
        id=7, pulse_id=2**40 + 3, frame_index=11, daq_rec=5, n_recv_packets=127, module_id=2,
        bit_depth=32, pos_y=3, pos_x=4,
    )
    raw = frame.pack()
    assert len(raw) == 54
    assert struct.unpack_from("<Q", raw, 0)[0] == 7
    assert struct.unpack_from("<Q", raw, 8)[0] == 2**40 + 3
    assert struct.unpack_from("<Q", raw, 32)[0] == 127
    assert struct.unpack_from("<Q", raw, 40)[0] == 2
    assert struct.unpack_from("<3H", raw, 48) == (32, 3, 4)
    assert ModuleFrame.unpack(raw) == frame
    assert ModuleFrame.unpack(memoryview(raw)) == frame


def test_module_frame_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="expected 54 bytes, got 53"):
        ModuleFrame.unpack(b"\0" * 53)


def test_image_metadata_packs_era_b_layout() -> None:
    meta = ImageMetadata(
        id=123456789, height=514, width=1030, dtype=DTYPE_CODES["uint32"],
        status=ImageStatus.MISSING_PACKETS, encoding=Encoding.BSHUF_LZ4, source_id=9,
        user_1=17, user_2=2**33 + 1,
    )
    raw = meta.pack()
    assert len(raw) == 56
    # uint64 version, id, height, width
    assert struct.unpack_from("<4Q", raw, 0) == (1, 123456789, 514, 1030)
    # uint16 dtype, encoding, source_id, status
    assert struct.unpack_from("<4H", raw, 32) == (4, 1, 9, 1)
    # uint64 user_1, user_2
    assert struct.unpack_from("<2Q", raw, 40) == (17, 2**33 + 1)
    assert ImageMetadata.unpack(raw) == meta


def test_image_metadata_properties() -> None:
    meta = ImageMetadata(id=1, height=4, width=6, dtype=DTYPE_CODES["float32"], user_1=3)
    assert meta.version == ImageMetadata.VERSION == 1
    assert meta.status == ImageStatus.GOOD
    assert meta.encoding == Encoding.RAW
    assert meta.shape == (4, 6)
    assert meta.numpy_dtype == np.dtype("float32")
    assert meta.n_missing_packets == 3


def test_image_metadata_unknown_dtype_code() -> None:
    with pytest.raises(ValueError, match="unknown dtype code 3"):
        _ = ImageMetadata(id=1, height=1, width=1, dtype=3).numpy_dtype


def test_image_metadata_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="expected 56 bytes, got 54"):
        ImageMetadata.unpack(b"\0" * 54)


def test_store_stream_json_round_trip() -> None:
    meta = ImageMetadata(id=42, height=2, width=3, dtype=DTYPE_CODES["uint16"], user_2=8)
    msg = StoreStream(
        output_file="/tmp/x/run.h5", run_id=5, n_images=100, image_id=42, i_image=7,
        op=StoreOp.WRITE, request_id="req-1", metadata=meta.pack().hex(),
        request={"sources": ["a", "b"], "n_images": 100}, reason="",
    )
    raw = msg.to_json()
    assert isinstance(raw, bytes)
    doc = json.loads(raw)
    assert doc["output_file"] == "/tmp/x/run.h5"
    assert doc["op"] == 0
    assert doc["metadata"] == meta.pack().hex()
    back = StoreStream.from_json(raw)
    assert back == msg
    assert back.image_metadata == meta


def test_store_stream_stop_message_defaults() -> None:
    msg = StoreStream(output_file="f.h5", run_id=1, n_images=0, image_id=0, i_image=0, op=StoreOp.STOP,
                      reason="killed")
    back = StoreStream.from_json(msg.to_json())
    assert back.op == StoreOp.STOP
    assert back.reason == "killed"
    assert back.request is None
    assert back.metadata == ""


def test_sls_header_dtype_matches_slsdetector_v2_header() -> None:
    assert SLS_HEADER_DTYPE.itemsize == 48
    # sls_detector_header: frameNumber, expLength, packetNumber, detSpec1 (bunch id), timestamp,
    # modId, row, column, detSpec2, detSpec3, detSpec4, detType, version
    raw = struct.pack("<QIIdQHHHHIHBB", 1001, 20, 127, 3.0, 555, 2, 1, 0, 0, 0xDEAD, 0, 3, 2)
    assert len(raw) == 48
    hdr = np.frombuffer(raw, dtype=SLS_HEADER_DTYPE)[0]
    assert hdr["framenum"] == 1001
    assert hdr["exptime"] == 20
    assert hdr["packetnum"] == 127
    assert hdr["bunchid"] == 3.0
    assert hdr["timestamp"] == 555
    assert hdr["module_id"] == 2
    assert hdr["row"] == 1
    assert hdr["debug"] == 0xDEAD
    assert hdr["detector_type"] == 3
    assert hdr["header_version"] == 2


def test_gigafrost_header_dtype_is_32_bytes() -> None:
    assert GF_HEADER_DTYPE.itemsize == 32
    raw = struct.pack("<BBBBIIHHQII", 0xCB, 10, 64, 0, 7, 99, 1, 16, 2**40, 5, 6)
    assert len(raw) == 32
    hdr = np.frombuffer(raw, dtype=GF_HEADER_DTYPE)[0]
    assert hdr["protocol_id"] == 0xCB
    assert hdr["scan_id"] == 7
    assert hdr["frame_index"] == 99
    assert hdr["packet_starting_row"] == 16
    assert hdr["image_timing"] == 2**40
    assert hdr["scan_time"] == 6


def test_dtype_codes() -> None:
    assert DTYPE_CODES["uint8"] == 1
    assert DTYPE_CODES["uint16"] == 2
    assert DTYPE_CODES["uint32"] == 4
    assert DTYPE_CODES["float32"] == 14
    for name, code in DTYPE_CODES.items():
        assert CODE_DTYPES[code] == name
        np.dtype(name)  # every name is a numpy dtype
    assert len(CODE_DTYPES) == len(DTYPE_CODES)  # codes are unique


# ================================================================================================
# ram_buffer
# ================================================================================================


@pytest.fixture
def ring_name():
    """A unique /dev/shm name; whatever a test leaves at that path is removed afterwards."""
    name = f"stddaq-test-core-{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        shm_path(name).unlink(missing_ok=True)


@pytest.fixture
def rings():
    """Rings a test opened; closed afterwards (readers first, owners last)."""
    opened: list[RingBuffer] = []
    try:
        yield opened
    finally:
        for ring in sorted(opened, key=lambda r: r.owner):
            ring.close()


def test_shm_path() -> None:
    assert shm_path("abc") == Path("/dev/shm/abc")
    for bad in ("", "a/b", "/abs"):
        with pytest.raises(ValueError, match="invalid shared-memory name"):
            shm_path(bad)


def test_create_layout(ring_name, rings) -> None:
    ring = RingBuffer.create(ring_name, slot_nbytes=100, n_slots=4)
    rings.append(ring)
    assert ring.owner
    assert (ring.n_slots, ring.slot_nbytes, ring.slot_stride) == (4, 100, 128)
    path = shm_path(ring_name)
    st = os.stat(path)
    assert st.st_size % 4096 == 0
    assert st.st_size >= RING_HEADER_BYTES + 4 * 128
    with open(path, "rb") as fh:
        assert fh.read(8) == MAGIC
    assert ring.begin_write(0).shape == (100,)
    assert ring.slot_index(9) == 1


def test_create_rejects_bad_sizes(ring_name) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        RingBuffer.create(ring_name, slot_nbytes=0, n_slots=4)
    with pytest.raises(ValueError, match="must be positive"):
        RingBuffer.create(ring_name, slot_nbytes=16, n_slots=0)
    assert not shm_path(ring_name).exists()


def test_create_allocates_whole_segment(ring_name, rings, monkeypatch) -> None:
    calls = []
    real = ram_buffer.os.posix_fallocate

    def spy(fd, offset, length):
        calls.append((offset, length))
        return real(fd, offset, length)

    monkeypatch.setattr(ram_buffer.os, "posix_fallocate", spy)
    rings.append(RingBuffer.create(ring_name, slot_nbytes=64 * 1024, n_slots=4))
    st = os.stat(shm_path(ring_name))
    assert calls == [(0, st.st_size)]
    assert st.st_blocks * 512 >= st.st_size  # every page is backed, none left to fault in later


def _mapped_kib(path: Path) -> int:
    """Resident kB of this process' mapping(s) of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_owner_and_readers_map_every_page_before_use(ring_name, rings) -> None:
    """No page of a ring may first be faulted in during an acquisition (ram_buffer._populate)."""
    owner = RingBuffer.create(ring_name, slot_nbytes=256 * 1024, n_slots=8)
    rings.append(owner)
    size_kib = os.stat(shm_path(ring_name)).st_size // 1024
    assert _mapped_kib(shm_path(ring_name)) >= size_kib  # the owner's mapping alone
    owner.close()
    rings.remove(owner)
    rings.append(RingBuffer.create(ring_name, slot_nbytes=256 * 1024, n_slots=8))
    reader = RingBuffer.attach(ring_name)
    rings.append(reader)
    assert _mapped_kib(shm_path(ring_name)) >= 2 * size_kib  # owner + reader, nothing touched yet
    glance = RingBuffer.attach(ring_name, populate=False)  # a short look maps only what it reads
    rings.append(glance)
    assert _mapped_kib(shm_path(ring_name)) < 3 * size_kib


def test_create_enospc_names_ring_and_leaves_no_file(ring_name, monkeypatch) -> None:
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ram_buffer.os, "posix_fallocate", no_room)
    with pytest.raises(OSError) as info:
        RingBuffer.create(ring_name, slot_nbytes=4096, n_slots=8)
    assert info.value.errno == errno.ENOSPC
    assert f"ring {ring_name}" in str(info.value)
    assert "/dev/shm has no room" in str(info.value)
    assert not shm_path(ring_name).exists()


def test_create_other_oserror_is_reraised_and_leaves_no_file(ring_name, monkeypatch) -> None:
    def broken(fd, offset, length):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ram_buffer.os, "posix_fallocate", broken)
    with pytest.raises(OSError, match="I/O error") as info:
        RingBuffer.create(ring_name, slot_nbytes=4096, n_slots=8)
    assert info.value.errno == errno.EIO
    assert not shm_path(ring_name).exists()


def test_write_commit_and_read_from_reader(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=32, n_slots=4)
    rings.append(owner)
    reader = RingBuffer.attach(ring_name, timeout=0)
    rings.append(reader)
    assert not reader.owner
    assert (reader.n_slots, reader.slot_nbytes, reader.slot_stride) == (4, 32, 64)
    assert reader.newest_id() is None
    assert not reader.holds(0)

    dst = owner.begin_write(5)
    dst[:] = np.arange(32, dtype=np.uint8)
    assert not reader.holds(5)  # begun, not committed
    owner.commit(5, meta=b"meta-5")
    assert reader.holds(5)
    assert reader.newest_id() == 5
    view = reader.view(5)
    assert np.array_equal(view, np.arange(32, dtype=np.uint8))
    reader.check(5)
    assert reader.meta(5, 6) == b"meta-5"
    assert reader.read(5) == bytes(range(32))

    owner.write(6, np.full(8, 0x01020304, dtype="<u4"), meta=b"m6")
    assert reader.newest_id() == 6
    assert reader.view(6)[:4].tobytes() == b"\x04\x03\x02\x01"
    assert reader.holds(5)  # a different slot, untouched


def test_view_of_unwritten_slot(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    rings.append(owner)
    with pytest.raises(SlotOverwritten, match="slot 2 no longer holds id 2, it holds nothing yet"):
        owner.view(2)
    with pytest.raises(SlotOverwritten):
        owner.meta(2, 4)


def test_view_of_slot_being_rewritten(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    rings.append(owner)
    reader = RingBuffer.attach(ring_name, timeout=0)
    rings.append(reader)
    owner.write(1, b"a" * 16)
    assert reader.read(1) == b"a" * 16

    owner.begin_write(5)  # same slot as 1, newer id, not committed yet
    assert not reader.holds(1)
    with pytest.raises(SlotOverwritten, match=r"id 1, it holds id 5 \(being written\)"):
        reader.view(1)
    with pytest.raises(SlotOverwritten):
        reader.check(1)
    with pytest.raises(SlotOverwritten):
        reader.meta(1, 4)
    with pytest.raises(SlotOverwritten):
        reader.view(5)  # not complete yet either

    owner.commit(5)
    with pytest.raises(SlotOverwritten, match=r"no longer holds id 1, it holds id 5$"):
        reader.view(1)
    assert reader.holds(5)
    assert reader.newest_id() == 5


def test_check_after_view_detects_overwrite_meanwhile(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    rings.append(owner)
    reader = RingBuffer.attach(ring_name, timeout=0)
    rings.append(reader)
    owner.write(3, b"x" * 16)
    view = reader.view(3)
    reader.check(3)  # nothing happened yet
    owner.write(7, b"y" * 16)  # laps slot 3 while the reader still uses its view
    assert bytes(view) == b"y" * 16  # the view aliases shared memory...
    with pytest.raises(SlotOverwritten, match="ring .*: slot 3 no longer holds id 3, it holds id 7"):
        reader.check(3)  # ...so check() must tell the reader
    del view


def test_commit_rejects_oversized_meta(ring_name, rings) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    rings.append(owner)
    owner.begin_write(0)
    owner.commit(0, meta=b"m" * SLOT_META_BYTES)
    assert owner.meta(0, SLOT_META_BYTES) == b"m" * SLOT_META_BYTES
    owner.begin_write(1)
    with pytest.raises(ValueError, match=f"limited to {SLOT_META_BYTES} bytes"):
        owner.commit(1, meta=b"m" * (SLOT_META_BYTES + 1))
    assert not owner.holds(1)


def test_only_owner_unlinks_on_close(ring_name) -> None:
    owner = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    try:
        reader = RingBuffer.attach(ring_name, timeout=0)
        reader.close()
        reader.close()  # idempotent
        assert shm_path(ring_name).exists()
    finally:
        owner.close()
    assert not shm_path(ring_name).exists()
    owner.close()  # idempotent


def test_close_with_outstanding_view(ring_name) -> None:
    with RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4) as owner:
        owner.write(0, b"z" * 16)
        reader = RingBuffer.attach(ring_name, timeout=0)
        view = reader.view(0)
        reader.close()  # must not raise although a view is alive
        assert bytes(view) == b"z" * 16
        del view
    assert not shm_path(ring_name).exists()  # context manager closed (and unlinked) the owner


def test_attach_missing_ring(ring_name) -> None:
    with pytest.raises(FileNotFoundError, match=f"ring /dev/shm/{ring_name} does not exist"):
        RingBuffer.attach(ring_name, timeout=0)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        RingBuffer.attach(ring_name, timeout=0.1)
    assert time.monotonic() - t0 >= 0.1


def test_attach_waits_for_producer(ring_name, rings) -> None:
    created: list[RingBuffer] = []

    def produce() -> None:
        time.sleep(0.05)
        created.append(RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4))

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        reader = RingBuffer.attach(ring_name, timeout=5)
        rings.append(reader)
        assert reader.n_slots == 4
    finally:
        thread.join()
        rings.extend(created)


def test_attach_refuses_file_that_is_not_a_ring(ring_name) -> None:
    path = shm_path(ring_name)
    path.write_bytes(b"NOTARING" + b"\0" * (2 * RING_HEADER_BYTES))
    with pytest.raises(ValueError, match="is not a std-daq ring"):
        RingBuffer.attach(ring_name, timeout=None)  # refused at once, not waited for
    # The constructor itself checks the magic too.
    fd = os.open(path, os.O_RDWR)
    with pytest.raises(ValueError, match="is not a std-daq ring"):
        RingBuffer(ring_name, fd, owner=False)
    assert path.exists()


def test_attach_refuses_truncated_file(ring_name) -> None:
    shm_path(ring_name).write_bytes(MAGIC)  # right magic, but shorter than the ring header
    with pytest.raises(ValueError, match="too short"):
        RingBuffer.attach(ring_name, timeout=0)


def test_recreating_a_ring_after_a_crash_gives_a_new_file(ring_name, rings) -> None:
    """An owner killed without unlinking: its successor's ring is a new file (new inode), readers of
    the old one keep an intact mapping and AttachedRing notices the change."""
    first = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
    first.write(0, b"1" * 16)
    attached = AttachedRing(ring_name)
    old = attached.get()
    assert old is not None
    try:
        second = RingBuffer.create(ring_name, slot_nbytes=64, n_slots=8)  # no unlink in between
        rings.append(second)
        assert second.inode != old.inode
        assert old.read(0) == b"1" * 16  # the old mapping is untouched (no truncation, no SIGBUS)
        assert attached.refreshed() is True
        assert attached.ring is not None and attached.ring.slot_nbytes == 64
        assert [p.name for p in shm_path(ring_name).parent.glob(f".{ring_name}.*")] == []
    finally:
        first.owner = False  # its file was replaced: do not unlink the successor's
        first.close()
        attached.close()


def test_attached_ring_get_waits_for_the_ring(ring_name, rings) -> None:
    attached = AttachedRing(ring_name)
    timer = threading.Timer(0.2, lambda: rings.append(RingBuffer.create(ring_name, 16, 4)))
    timer.start()
    try:
        assert attached.get(timeout=30) is not None
    finally:
        timer.join()
        attached.close()


def test_attached_ring_reattaches_after_recreate(ring_name, rings) -> None:
    attached = AttachedRing(ring_name)
    try:
        assert attached.get() is None  # producer not running
        assert not attached.refreshed()

        first = RingBuffer.create(ring_name, slot_nbytes=16, n_slots=4)
        rings.append(first)
        first.write(0, b"1" * 16)
        ring = attached.get()
        assert ring is not None and not ring.owner
        assert ring.read(0) == b"1" * 16
        assert attached.get() is ring
        assert attached.refreshed() is False  # same segment
        assert attached.ring is ring

        rings.remove(first)
        first.close()  # owner unlinks; producer restarts with a new segment (new inode)
        assert attached.refreshed() is False  # nothing on disk: keep the old mapping
        second = RingBuffer.create(ring_name, slot_nbytes=32, n_slots=8)
        rings.append(second)
        second.write(0, b"2" * 32)
        assert attached.refreshed() is True
        new = attached.ring
        assert new is not None and new is not ring
        assert (new.n_slots, new.slot_nbytes) == (8, 32)
        assert new.read(0) == b"2" * 32
        assert attached.refreshed() is False
    finally:
        attached.close()
    assert attached.ring is None
    assert shm_path(ring_name).exists()  # a reader's close never unlinks
