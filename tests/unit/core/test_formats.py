"""Wire formats (daq_backend.formats): module frame and image metadata layouts, the store stream,
packet headers, dtype codes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

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
