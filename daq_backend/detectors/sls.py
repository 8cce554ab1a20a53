"""The slsDetector v2 packet header shared by Jungfrau and Eiger (reference §2.1, §2.2).

Parsing uses one precompiled ``struct`` call per datagram: for a 48-byte header it is several times
cheaper than a numpy view, and receivers call it for every packet.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from daq_backend.detectors.base import MAX_FRAME_NUMBER, DetectorLayout, PacketInfo
from daq_backend.formats import SLS_HEADER_DTYPE, SLS_HEADER_SIZE

#: same layout as ``formats.SLS_HEADER_DTYPE``
SLS_HEADER = struct.Struct("<QIIdQHHHHIHBB")
assert SLS_HEADER.size == SLS_HEADER_SIZE

#: ``slsDetectorDefs::detectorType`` values the detectors put into ``detector_type``
SLS_DETECTOR_TYPE = {"eiger": 1, "jungfrau": 3}
SLS_HEADER_VERSION = 2
_MAX_U64 = float(2**64)
#: Largest pulse id taken from a bunch id: a double holds every integer up to 2**53 exactly (SwissFEL's
#: pulse ids are near 2**34); a larger or fractional bunch id is no pulse id.
MAX_PULSE_ID = 2**53
_NOT_A_PULSE_ID = MAX_PULSE_ID + 1
assert SLS_HEADER_VERSION == 2  # spelled out in ``parse``, its hot path


class SlsLayout(DetectorLayout):
    """Fixed-size packets: payload of packet *i* lives at ``i * payload_size`` in the frame."""

    header_dtype = SLS_HEADER_DTYPE
    header_size = SLS_HEADER_SIZE
    payload_size: int
    #: the header's ``bunchid`` is the SwissFEL pulse id (Jungfrau) rather than unused (Eiger)
    bunchid_is_pulse_id: bool
    #: image ids may come from the pulse id, so its range is checked (``numbers_in_range``)
    pulse_id_used: bool = False
    #: ``detector_type`` every packet of this detector carries (``SLS_DETECTOR_TYPE``)
    sls_detector_type: int

    def _init_sizes(self, payload_size: int, packets_per_frame: int) -> None:
        self.payload_size = payload_size
        self.packets_per_frame = packets_per_frame
        self.frame_nbytes = payload_size * packets_per_frame
        self.max_datagram = self.header_size + payload_size

    def packet_slice(self, packet_index: int) -> tuple[int, int]:
        self._check_packet_index(packet_index)
        return packet_index * self.payload_size, self.payload_size

    def datagram_size(self, packet_index: int) -> int:
        self._check_packet_index(packet_index)
        return self.max_datagram

    def parse(self, datagram: memoryview | bytes | bytearray) -> PacketInfo | None:
        """None unless the datagram has this detector's size, a packet index of a frame, the
        detector type and header version slsDetectorPackage defines and (Jungfrau) a bunch id that
        is a number >= 0. A fractional bunch id where pulse ids are used parses with a pulse id
        beyond ``MAX_PULSE_ID``, so that ``numbers_in_range`` refuses it with the other numbers no
        detector sends."""
        if len(datagram) != self.max_datagram:
            return None
        (framenum, _exptime, packetnum, bunchid, _timestamp, module_id, row, column, _z, debug,
         _round_robin, det_type, version) = SLS_HEADER.unpack_from(datagram)
        if packetnum >= self.packets_per_frame or det_type != self.sls_detector_type or version != 2:
            return None
        pulse_id = 0
        if self.bunchid_is_pulse_id:
            # NaN fails both comparisons; a garbage bunch id is not a packet of ours
            if not 0.0 <= bunchid < _MAX_U64:
                return None
            pulse_id = int(bunchid)
            if self.pulse_id_used and pulse_id != bunchid:
                pulse_id = _NOT_A_PULSE_ID
        return PacketInfo(framenum, packetnum, pulse_id, debug, module_id, row, column)

    def numbers_in_range(self, frame_number: int, pulse_id: int) -> bool:
        return frame_number <= MAX_FRAME_NUMBER and (not self.pulse_id_used or pulse_id <= MAX_PULSE_ID)

    def encode_headers(
        self, module_id: int, frame_number: int, pulse_id: int = 0, **fields: Any
    ) -> np.ndarray:
        """Fields: ``daq_rec`` (→ ``debug``), ``timestamp``, ``exptime`` (all default 0). The header's
        ``module_id`` is the config's ``header_module_ids`` entry of the module, else its number."""
        unknown = set(fields) - {"daq_rec", "timestamp", "exptime"}
        if unknown:
            raise TypeError(f"unknown header field(s) {sorted(unknown)}")
        if pulse_id and not math.isfinite(float(pulse_id)):
            raise ValueError(f"pulse_id {pulse_id} is not a number")
        h = np.zeros(self.packets_per_frame, dtype=SLS_HEADER_DTYPE)
        row, column = self.grid_position(module_id)
        h["framenum"] = frame_number
        h["exptime"] = fields.get("exptime", 0)
        h["packetnum"] = np.arange(self.packets_per_frame)
        h["bunchid"] = float(pulse_id)
        h["timestamp"] = fields.get("timestamp", 0)
        h["module_id"] = self.config.header_module_ids.get(module_id, module_id)
        h["row"] = row
        h["column"] = column
        h["debug"] = fields.get("daq_rec", 0)
        h["detector_type"] = SLS_DETECTOR_TYPE[self.config.detector_type.value]
        h["header_version"] = SLS_HEADER_VERSION
        return h
