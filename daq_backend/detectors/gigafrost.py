"""GigaFRoST: 8 UDP links of 12-bit packed pixels (reference §2.3, §4.3).

Each quadrant (SW=0, SE=1, NW=2, NE=3) is W/2 wide and H/2 high and is sent by two links
(``module_id = 2*quadrant + link``) that interleave rows: the odd link takes the row of each pair
farther from the image centre. Southern quadrants grow downwards from the centre row H/2, northern
ones upwards from row H/2-1 (the SDB converter's convention; "north" is image row 0).

A packet carries ``rows_per_packet`` module rows starting at ``packet_starting_row``; the packet
index is that row divided by ``rows_per_packet``. Packets with an odd row count get 36 padding bytes
at the end of the payload when the module width is not a multiple of 48 (never stored).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from daq_backend.config import ConfigError, DetectorConfig
from daq_backend.detectors.base import DetectorLayout, PacketInfo, PixelIndex, span
from daq_backend.formats import GF_HEADER_DTYPE, GF_HEADER_SIZE, GF_MAX_PAYLOAD, GF_PROTOCOL_ID

GF_HEADER = struct.Struct("<BBBBIIHHQII")
assert GF_HEADER.size == GF_HEADER_SIZE

GF_N_LINKS = 8
GF_PADDING = 36  # 24 px * 1.5 bytes
GF_DEFAULT_CORR_MODE = 5
DO_NOT_STORE = 0x8000
QUADRANT_NAMES = ("SW", "SE", "NW", "NE")


@dataclass(frozen=True)
class GfGeometry:
    """Per-link packet geometry of a ``height x width`` GigaFRoST image (exact integer arithmetic of
    SDB ``gigafrost.hpp``; the order of the operations matters because of the truncations)."""

    height: int
    width: int
    module_width: int
    module_height: int
    rows_per_packet: int
    packets_per_frame: int
    last_packet_rows: int

    @classmethod
    def for_image(cls, height: int, width: int) -> GfGeometry:
        if height % 4 or width % 24 or height <= 0 or width <= 0:
            raise ValueError(f"gigafrost needs height % 4 == 0 and width % 24 == 0, got {height}x{width}")
        module_width, module_height = width // 2, height // 4
        blocks = module_width // 12
        cache_lines = (GF_MAX_PAYLOAD // (36 * blocks)) * blocks // 2
        rows = min(cache_lines * 48 // module_width, module_height)
        if rows < 1:
            raise ValueError(f"gigafrost image width {width} does not fit one row into a packet")
        n_packets = -(-module_height // rows)
        last_rows = module_height % rows or rows
        return cls(height, width, module_width, module_height, rows, n_packets, last_rows)

    def row_bytes(self) -> int:
        return self.module_width * 3 // 2

    def padding(self, n_rows: int) -> int:
        return GF_PADDING if n_rows % 2 == 1 and self.module_width % 48 != 0 else 0

    @property
    def packet_bytes(self) -> int:
        """Data bytes of a full packet (without padding)."""
        return self.rows_per_packet * self.row_bytes()

    @property
    def last_packet_bytes(self) -> int:
        return self.last_packet_rows * self.row_bytes()

    @property
    def frame_bytes(self) -> int:
        return self.module_height * self.row_bytes()

    def packet_rows(self, packet_index: int) -> int:
        return self.last_packet_rows if packet_index == self.packets_per_frame - 1 else self.rows_per_packet

    def payload_size(self, packet_index: int) -> int:
        """Payload on the wire: data bytes plus padding."""
        rows = self.packet_rows(packet_index)
        return rows * self.row_bytes() + self.padding(rows)


def unpack_12bit(data: np.ndarray | bytes | memoryview) -> np.ndarray:
    """uint16 pixels from packed 12-bit data: bytes ``b0 b1 b2`` hold ``p0 = b0 | (b1 & 0xF) << 8``
    and ``p1 = b1 >> 4 | b2 << 4`` (pixel *i* at bit ``12*i`` of a little-endian integer)."""
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if raw.size % 3:
        raise ValueError(f"12-bit data must be a multiple of 3 bytes, got {raw.size}")
    out = np.empty(raw.size // 3 * 2, dtype=np.uint16)
    _unpack_into(raw.reshape(-1, 3), out[0::2], out[1::2])
    return out


def _unpack_into(triplets: np.ndarray, even: np.ndarray, odd: np.ndarray) -> None:
    """Unpack ``(..., 3)`` bytes into the even/odd pixel views (any integer dtype, any strides)."""
    words = np.empty((*triplets.shape[:-1], 4), dtype=np.uint8)
    words[..., :3] = triplets
    words[..., 3] = 0
    value = words.view("<u4")[..., 0]
    np.bitwise_and(value, 0xFFF, out=even, casting="unsafe")
    np.right_shift(value, 12, out=odd, casting="unsafe")


def pack_12bit(pixels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`unpack_12bit`: an even number of values < 4096 -> uint8 bytes."""
    values = np.asarray(pixels).reshape(-1)
    if values.size % 2:
        raise ValueError(f"12-bit packing needs an even number of pixels, got {values.size}")
    if values.size and (values.min() < 0 or values.max() > 0xFFF):
        raise ValueError("12-bit packing: pixel values must lie in 0..4095")
    pairs = values.reshape(-1, 2).astype("<u4")
    words = pairs[:, 0] | (pairs[:, 1] << 12)
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, 4)[:, :3]).reshape(-1)


class GigaFrostLayout(DetectorLayout):
    header_dtype = GF_HEADER_DTYPE
    header_size = GF_HEADER_SIZE
    raw_dtype = np.dtype("<u2")

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        if config.bit_depth != 16:
            raise ConfigError(
                f"bit_depth: gigafrost images are 16 bit (12-bit pixels), got {config.bit_depth}"
            )
        h, w = config.image_shape
        if h // 2 > 0x3FF:
            raise ConfigError(
                f"image_pixel_height: at most 2046 for gigafrost (10-bit quadrant rows), got {h}"
            )
        if w // 2 // 12 > 0xFF:
            raise ConfigError(f"image_pixel_width: at most 6120 for gigafrost (8-bit row blocks), got {w}")
        try:
            g = GfGeometry.for_image(h, w)
        except ValueError as exc:
            raise ConfigError(f"image_pixel_height/width: {exc}") from None
        self.geometry = g
        self.module_shape = (g.module_height, g.module_width)
        self.packets_per_frame = g.packets_per_frame
        self.frame_nbytes = g.frame_bytes
        self._sizes = tuple(self.header_size + g.payload_size(i) for i in range(g.packets_per_frame))
        self._valid_sizes = frozenset(self._sizes)
        self.max_datagram = max(self._sizes)

    # -- packets ---------------------------------------------------------------------------------
    def packet_slice(self, packet_index: int) -> tuple[int, int]:
        self._check_packet_index(packet_index)
        g = self.geometry
        return packet_index * g.packet_bytes, g.packet_rows(packet_index) * g.row_bytes()

    def datagram_size(self, packet_index: int) -> int:
        self._check_packet_index(packet_index)
        return self._sizes[packet_index]

    def parse(self, datagram: memoryview | bytes | bytearray) -> PacketInfo | None:
        n = len(datagram)
        if n not in self._valid_sizes:
            return None
        (protocol, _row_blocks, _quadrant_rows, status, scan_id, frame_index, image_flags, start_row,
         timing, _sync_time, _scan_time) = GF_HEADER.unpack_from(datagram)
        rows = self.geometry.rows_per_packet
        if protocol != GF_PROTOCOL_ID or start_row % rows or start_row >= self.geometry.module_height:
            return None
        index = start_row // rows
        if n != self._sizes[index]:
            return None
        quadrant, link = status >> 6, (status >> 5) & 1
        return PacketInfo(
            frame_number=frame_index, packet_index=index, module_id=2 * quadrant + link, scan_id=scan_id,
            do_not_store=bool(image_flags & DO_NOT_STORE), quadrant=quadrant, link=link,
            image_timing=timing,
        )

    def image_id(self, info: PacketInfo) -> int:
        return info.frame_number

    def encode_headers(
        self, module_id: int, frame_number: int, pulse_id: int = 0, **fields: Any
    ) -> np.ndarray:
        """Fields: ``scan_id``, ``do_not_store``, ``image_timing``, ``sync_time``, ``scan_time``,
        ``corr_mode`` (default 5). Quadrant/link bits from ``module_id`` (or its
        ``header_module_ids`` entry); the SWAP bit (bit 0 of
        ``quadrant_rows``) is set for the western quadrants, as PSI's simulator does. GigaFRoST has
        no pulse id, ``pulse_id`` is ignored."""
        allowed = {"scan_id", "do_not_store", "image_timing", "sync_time", "scan_time", "corr_mode"}
        unknown = set(fields) - allowed
        if unknown:
            raise TypeError(f"unknown header field(s) {sorted(unknown)}")
        if not 0 <= frame_number <= 0xFFFFFFFF:
            raise ValueError(f"gigafrost frame_index is a 32-bit counter, cannot send {frame_number}")
        g = self.geometry
        quadrant, link = divmod(self.config.header_module_ids.get(module_id, module_id) % GF_N_LINKS, 2)
        quadrant_height = g.height // 2
        swap = 1 if quadrant % 2 == 0 else 0
        h = np.zeros(self.packets_per_frame, dtype=GF_HEADER_DTYPE)
        h["protocol_id"] = GF_PROTOCOL_ID
        h["quadrant_row_length_in_blocks"] = g.module_width // 12
        h["quadrant_rows"] = (quadrant_height & 0xFF) | swap
        h["status_flags"] = (
            quadrant << 6 | link << 5 | (fields.get("corr_mode", GF_DEFAULT_CORR_MODE) & 0x7) << 2
            | (quadrant_height >> 8) & 0x3
        )
        h["scan_id"] = fields.get("scan_id", 0)
        h["frame_index"] = frame_number
        h["image_status_flags"] = DO_NOT_STORE if fields.get("do_not_store", False) else 0
        h["packet_starting_row"] = np.arange(self.packets_per_frame) * g.rows_per_packet
        h["image_timing"] = fields.get("image_timing", 0)
        h["sync_time"] = fields.get("sync_time", 0)
        h["scan_time"] = fields.get("scan_time", 0)
        return h

    # -- geometry --------------------------------------------------------------------------------
    @cached_property
    def _pixels(self) -> dict[int, PixelIndex]:
        g = self.geometry
        half_h, half_w = g.height // 2, g.width // 2
        out: dict[int, PixelIndex] = {}
        for m in range(GF_N_LINKS):
            quadrant, odd = divmod(m, 2)
            south = quadrant in (0, 1)
            if south:
                rows = span(half_h + odd, g.module_height, 2)
            else:
                rows = span(half_h - 1 - odd, g.module_height, -2)
            cols = slice(0, half_w) if quadrant in (0, 2) else slice(half_w, g.width)
            out[m] = (rows, cols)
        return out

    def module_pixels(self, module_id: int) -> PixelIndex:
        self._check_module(module_id)
        return self._pixels[module_id % GF_N_LINKS]

    def assemble(self, module_id: int, frame: np.ndarray, image: np.ndarray) -> None:
        self._check_image(image)
        data = self._frame_view(frame)
        dst = image[self.module_pixels(module_id)]
        g = self.geometry
        triplets = data.reshape(g.module_height, g.module_width // 2, 3)
        _unpack_into(triplets, dst[:, 0::2], dst[:, 1::2])
