"""Wire formats, defined once (reference §2 and §3): UDP packet headers, the module-frame message,
the Era B 56-byte ``ImageMetadata`` and the JSON ``StoreStream``.

Headers are numpy structured dtypes so a receiver can view a packet buffer without creating Python
objects per field; the small messages use ``struct`` for explicit little-endian packing.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

# -- UDP headers ---------------------------------------------------------------------------------

#: slsDetector v2 header shared by Jungfrau and Eiger (48 bytes, little endian, packed).
SLS_HEADER_DTYPE = np.dtype(
    [
        ("framenum", "<u8"),
        ("exptime", "<u4"),
        ("packetnum", "<u4"),
        ("bunchid", "<f8"),
        ("timestamp", "<u8"),
        ("module_id", "<u2"),
        ("row", "<u2"),
        ("column", "<u2"),
        ("zcoord", "<u2"),
        ("debug", "<u4"),
        ("round_robin", "<u2"),
        ("detector_type", "u1"),
        ("header_version", "u1"),
    ]
)
assert SLS_HEADER_DTYPE.itemsize == 48

#: GigaFRoST 32-byte header (reference §2.3).
GF_HEADER_DTYPE = np.dtype(
    [
        ("protocol_id", "u1"),
        ("quadrant_row_length_in_blocks", "u1"),
        ("quadrant_rows", "u1"),
        ("status_flags", "u1"),
        ("scan_id", "<u4"),
        ("frame_index", "<u4"),
        ("image_status_flags", "<u2"),
        ("packet_starting_row", "<u2"),
        ("image_timing", "<u8"),
        ("sync_time", "<u4"),
        ("scan_time", "<u4"),
    ]
)
assert GF_HEADER_DTYPE.itemsize == 32

GF_PROTOCOL_ID = 0xCB
JUNGFRAU_PAYLOAD = 8192
JUNGFRAU_PACKETS_PER_FRAME = 128
EIGER_PAYLOAD = 4096
SLS_HEADER_SIZE = SLS_HEADER_DTYPE.itemsize
GF_HEADER_SIZE = GF_HEADER_DTYPE.itemsize
GF_MAX_PAYLOAD = 7400


# -- image status and dtype codes ----------------------------------------------------------------


class ImageStatus(IntEnum):
    """Per-image status (Era B numbering; also the HDF5 ``status`` dataset)."""

    GOOD = 0
    MISSING_PACKETS = 1
    ID_MISMATCH = 2
    #: set by the writer only: the ring slot was overwritten before the image reached the file
    LOST = 3


#: Era B ``ImageMetadata.dtype`` codes: bytes per pixel for integers; SDS's float codes.
DTYPE_CODES: dict[str, int] = {
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float16": 12,
    "float32": 14,
    "float64": 18,
}
CODE_DTYPES: dict[int, str] = {v: k for k, v in DTYPE_CODES.items()}


class Encoding(IntEnum):
    RAW = 0
    BSHUF_LZ4 = 1


# -- module frame (receiver -> synchroniser) -----------------------------------------------------


@dataclass(frozen=True)
class ModuleFrame:
    """Era B ``ModuleFrame`` (54 bytes): what a receiver announces after flushing a frame.

    ``n_recv_packets`` together with the detector's packets-per-frame gives the missing count."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<6Q3H")

    id: int
    pulse_id: int
    frame_index: int
    daq_rec: int
    n_recv_packets: int
    module_id: int
    bit_depth: int = 16
    pos_y: int = 0
    pos_x: int = 0

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.id, self.pulse_id, self.frame_index, self.daq_rec, self.n_recv_packets,
            self.module_id, self.bit_depth, self.pos_y, self.pos_x,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> ModuleFrame:
        if len(data) != cls.FORMAT.size:
            raise ValueError(f"ModuleFrame: expected {cls.FORMAT.size} bytes, got {len(data)}")
        return cls(*cls.FORMAT.unpack(data))


assert ModuleFrame.FORMAT.size == 54

#: In a frame-ring slot's metadata the receiver follows the ModuleFrame of an *incomplete* frame with
#: which packets arrived, one bit per packet (LSB first), so that the assembler can mark exactly the
#: pixels that never came (a converted image cannot show them as 0: (0 - pedestal) * gain looks like
#: data). Frames of more packets than the slot metadata has bits for carry no map.
RECEIVED_MAP_OFFSET = ModuleFrame.FORMAT.size
MAX_RECEIVED_MAP_PACKETS = 8 * (112 - RECEIVED_MAP_OFFSET)  # ram_buffer.SLOT_META_BYTES = 112


def received_map_nbytes(packets_per_frame: int) -> int:
    return (packets_per_frame + 7) // 8


def pack_received(received: bytes | bytearray | np.ndarray, packets_per_frame: int) -> bytes:
    """The packet map of a frame from a per-packet flag array (non-zero = arrived)."""
    flags = np.frombuffer(received, dtype=np.uint8, count=packets_per_frame) != 0
    return np.packbits(flags, bitorder="little").tobytes()


def unpack_received(data: bytes, packets_per_frame: int) -> np.ndarray:
    """Boolean per packet (True = arrived) from :func:`pack_received`'s bytes."""
    bits = np.frombuffer(data, dtype=np.uint8, count=received_map_nbytes(packets_per_frame))
    return np.unpackbits(bits, count=packets_per_frame, bitorder="little").astype(bool)


# -- image metadata (assembler -> everyone) ------------------------------------------------------


@dataclass(frozen=True)
class ImageMetadata:
    """Era B ``ImageMetadata`` (56 bytes): ``uint64 version, id, height, width; uint16 dtype, encoding,
    source_id, status; uint64 user_1, user_2``.

    We use ``user_1`` for the number of missing packets and ``user_2`` for the ring sequence
    number of the slot write, so a reader can check the slot still holds this image."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<4Q4H2Q")
    VERSION: ClassVar[int] = 1

    id: int
    height: int
    width: int
    dtype: int
    status: int = ImageStatus.GOOD
    encoding: int = Encoding.RAW
    source_id: int = 0
    user_1: int = 0
    user_2: int = 0
    version: int = 1

    @property
    def n_missing_packets(self) -> int:
        return self.user_1

    @property
    def numpy_dtype(self) -> np.dtype:
        try:
            return np.dtype(CODE_DTYPES[self.dtype])
        except KeyError:
            raise ValueError(f"ImageMetadata: unknown dtype code {self.dtype}") from None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.version, self.id, self.height, self.width,
            self.dtype, self.encoding, self.source_id, self.status, self.user_1, self.user_2,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> ImageMetadata:
        if len(data) != cls.FORMAT.size:
            raise ValueError(f"ImageMetadata: expected {cls.FORMAT.size} bytes, got {len(data)}")
        version, id_, h, w, dtype, encoding, source_id, status, u1, u2 = cls.FORMAT.unpack(data)
        return cls(id_, h, w, dtype, status, encoding, source_id, u1, u2, version)


assert ImageMetadata.FORMAT.size == 56


# -- store stream (writer agent -> h5 writer) ----------------------------------------------------


class StoreOp(IntEnum):
    """What a StoreStream message asks of the h5 writer (the seed README's ``op_code``)."""

    WRITE = 0
    START = 1
    STOP = 2


@dataclass
class StoreStream:
    """JSON store stream as emitted by the seed's writer_agent (reference §3.4), extended with the
    fields a writer needs to act on one message without other state: op, image metadata and the
    request (for the file's attributes)."""

    output_file: str
    run_id: int
    n_images: int
    image_id: int
    i_image: int
    op: int = StoreOp.WRITE
    request_id: str = ""
    metadata: str = ""  # hex of the 56-byte ImageMetadata for WRITE
    request: dict[str, Any] | None = None
    reason: str = ""  # for STOP: why the run ended (completed, killed, error text)

    def to_json(self) -> bytes:
        # vars(), not dataclasses.asdict: one message per image, and asdict deep-copies every field
        return json.dumps(vars(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StoreStream:
        return cls(**json.loads(data))

    @property
    def image_metadata(self) -> ImageMetadata:
        return ImageMetadata.unpack(bytes.fromhex(self.metadata))
