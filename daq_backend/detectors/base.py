"""What every detector type must answer: packet layout, header parsing/encoding and frame placement.

One ``DetectorLayout`` per detector type keeps every per-type rule (reference §2 and §4) in one
place, so receivers, the assembler and the simulator cannot disagree about a byte offset.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from daq_backend.config import DetectorConfig

#: Largest frame number a detector sends: slsDetectorPackage's ``UDP_HEADER_MAX_FRAME_VALUE`` (48 bit;
#: Jungfrau's counter is wider but starts at 1 and would need 4000 years at 2 kHz to get there).
MAX_FRAME_NUMBER = 2**48 - 1

#: An index usable as ``image[index]`` giving one module's pixels in module-local order.
PixelIndex = tuple["slice | np.ndarray", ...]


@dataclass(slots=True)
class PacketInfo:
    """The header fields of one datagram that the pipeline uses (the rest stay on the wire)."""

    frame_number: int
    packet_index: int
    pulse_id: int = 0
    daq_rec: int = 0
    #: the module id the header names (SLS ``module_id``; GigaFRoST ``2 * quadrant + link``): a
    #: receiver takes only the id its port's stream comes from (``readout.window``)
    module_id: int = 0
    row: int = 0
    column: int = 0
    scan_id: int = 0
    do_not_store: bool = False
    quadrant: int = 0
    link: int = 0
    image_timing: int = 0


def span(start: int, n: int, step: int) -> slice:
    """Slice of ``n`` indices from ``start`` walking by ``step`` (±1, ±2 ...) that also works when
    a descending slice ends at index 0 (``slice(5, -1, -1)`` would be empty)."""
    stop = start + n * step
    return slice(start, stop if stop >= 0 else None, step)


class DetectorLayout(abc.ABC):
    """Packet layout and geometry of one detector; immutable apart from lazily built caches."""

    #: numpy dtype of the header (a structured dtype from ``formats``)
    header_dtype: np.dtype
    header_size: int
    #: largest valid datagram; receive into a larger buffer so an oversize datagram is detected
    max_datagram: int
    packets_per_frame: int
    #: bytes of one module frame as stored in the frame ring (payloads concatenated, no padding)
    frame_nbytes: int
    #: (rows, columns) of one module frame in module-local (wire) order
    module_shape: tuple[int, int]
    #: numpy dtype of a module frame's pixels on the wire (GigaFRoST: after 12-bit unpacking)
    raw_dtype: np.dtype

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config

    # -- packets ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def packet_slice(self, packet_index: int) -> tuple[int, int]:
        """(offset, nbytes) of that packet's payload within the module frame."""

    @abc.abstractmethod
    def datagram_size(self, packet_index: int) -> int:
        """Exact length of that packet's datagram (header + payload + padding)."""

    @abc.abstractmethod
    def parse(self, datagram: memoryview | bytes | bytearray) -> PacketInfo | None:
        """The datagram's header fields, or None when it is not a valid packet of this detector."""

    @abc.abstractmethod
    def image_id(self, info: PacketInfo) -> int:
        """The id under which this packet's frame is stored and synchronised."""

    def numbers_in_range(self, frame_number: int, pulse_id: int) -> bool:
        """The numbers an image id is made of lie within what a detector sends (``MAX_FRAME_NUMBER``;
        SLS layouts also check pulse ids); a packet outside is rejected, never placed."""
        return frame_number <= MAX_FRAME_NUMBER

    @abc.abstractmethod
    def encode_headers(
        self, module_id: int, frame_number: int, pulse_id: int = 0, **fields: Any
    ) -> np.ndarray:
        """Headers of every packet of one module frame (structured array of ``header_dtype``);
        what a detector would send. Used by the simulator and the tests."""

    def _check_packet_index(self, packet_index: int) -> None:
        if not 0 <= packet_index < self.packets_per_frame:
            raise IndexError(
                f"packet index {packet_index} outside 0..{self.packets_per_frame - 1} "
                f"({self.config.detector_type.value})"
            )

    def payload(self, datagram: memoryview | bytes | bytearray, packet_index: int) -> memoryview:
        """The part of a (validated) datagram that goes into the frame at ``packet_slice``."""
        nbytes = self.packet_slice(packet_index)[1]
        return memoryview(datagram)[self.header_size : self.header_size + nbytes]

    def encode_datagrams(
        self, module_id: int, frame: bytes | bytearray | memoryview | np.ndarray,
        frame_number: int, pulse_id: int = 0, **fields: Any,
    ) -> list[bytes]:
        """Complete datagrams (header + payload + zero padding) for one module frame."""
        if isinstance(frame, np.ndarray):
            data = np.ascontiguousarray(frame).reshape(-1).view(np.uint8)
        else:
            data = np.frombuffer(frame, dtype=np.uint8)
        if data.nbytes != self.frame_nbytes:
            raise ValueError(f"module frame has {data.nbytes} bytes, expected {self.frame_nbytes}")
        headers = self.encode_headers(module_id, frame_number, pulse_id, **fields)
        out = []
        for i in range(self.packets_per_frame):
            off, n = self.packet_slice(i)
            dgram = bytearray(self.datagram_size(i))
            dgram[: self.header_size] = headers[i].tobytes()
            dgram[self.header_size : self.header_size + n] = data[off : off + n].tobytes()
            out.append(bytes(dgram))
        return out

    # -- geometry --------------------------------------------------------------------------------
    @abc.abstractmethod
    def module_pixels(self, module_id: int) -> PixelIndex:
        """Index of the module's pixels in the final image, shaped like ``module_shape`` in
        module-local order: ``image[idx] = frame`` places a raw frame (gap pixels excluded)."""

    @abc.abstractmethod
    def assemble(self, module_id: int, frame: np.ndarray, image: np.ndarray) -> None:
        """Place one module frame (uint8, ``frame_nbytes``, as stored) into the final image
        (``config.image_shape``, ``config.image_dtype``)."""

    def prepare(self) -> None:
        """Build lazy caches now (geometry, conversion parameters) so errors surface at start-up
        instead of at the first image."""
        _ = self.uncovered_pixels
        for module_id in self.config.required_modules:
            self.module_pixels(module_id)

    def _frame_view(self, frame: np.ndarray) -> np.ndarray:
        if frame.dtype != np.uint8 or frame.size != self.frame_nbytes:
            raise ValueError(
                f"module frame must be {self.frame_nbytes} uint8 bytes, got {frame.size} x {frame.dtype}"
            )
        return frame.reshape(-1)

    def _check_image(self, image: np.ndarray) -> None:
        if image.shape != self.config.image_shape or image.dtype != np.dtype(self.config.image_dtype):
            raise ValueError(
                f"image must be {self.config.image_shape} {self.config.image_dtype}, "
                f"got {image.shape} {image.dtype}"
            )

    def _check_module(self, module_id: int) -> None:
        if module_id not in self.config.required_modules:
            raise ValueError(
                f"module {module_id} is not part of {self.config.detector_name}'s image "
                f"(modules {list(self.config.required_modules)})"
            )

    def zero_module(self, module_id: int, image: np.ndarray) -> None:
        """Zero a module's pixels (a module frame that never arrived must not show stale data)."""
        image[self.module_pixels(module_id)] = 0

    def mark_missing_packets(self, module_id: int, received: np.ndarray, image: np.ndarray) -> None:
        """Mark the pixels of packets that never arrived (``received``: bool per packet) after
        :meth:`assemble`. Raw images need nothing: the receiver zeroed those bytes and the image
        status counts them; layouts that convert pixel values override this."""
        return None

    @cached_property
    def uncovered_pixels(self) -> np.ndarray:
        """Flat indices of image pixels that no module writes (gaps between modules)."""
        covered = np.zeros(self.config.image_shape, dtype=bool)
        for module_id in self.config.required_modules:
            covered[self.module_pixels(module_id)] = True
        return np.flatnonzero(~covered)

    def zero_uncovered(self, image: np.ndarray) -> None:
        """Zero the gap pixels between modules (a reused ring slot holds an older image)."""
        idx = self.uncovered_pixels
        if idx.size:
            image.reshape(-1)[idx] = 0

    def grid_position(self, module_id: int) -> tuple[int, int]:
        """(row, column) of the module in the detector's module grid, as slsDetector headers carry
        it: ranks of the module box's top and left edges among all modules."""
        positions = self.config.module_positions
        if module_id not in positions:
            return (module_id, 0)
        tops = sorted({min(p[1], p[3]) for p in positions.values()})
        lefts = sorted({min(p[0], p[2]) for p in positions.values()})
        x0, y0, x1, y1 = positions[module_id]
        return tops.index(min(y0, y1)), lefts.index(min(x0, x1))
