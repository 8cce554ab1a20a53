"""Per-detector packet layouts and assembly geometry: ``layout_for(config)`` is the one entry point.

Receivers use ``parse``/``image_id``/``packet_slice`` to put datagrams into module frames, the
assembler uses ``assemble`` to place module frames into images, the simulator uses
``encode_headers``/``encode_datagrams`` to produce what the detectors send.
"""

from __future__ import annotations

from daq_backend.config import DetectorConfig, DetectorType
from daq_backend.detectors.base import DetectorLayout, PacketInfo, PixelIndex
from daq_backend.detectors.eiger import EigerLayout
from daq_backend.detectors.gigafrost import GfGeometry, GigaFrostLayout, pack_12bit, unpack_12bit
from daq_backend.detectors.jungfrau import JungfrauLayout, load_pedestal_gain

_LAYOUTS: dict[DetectorType, type[DetectorLayout]] = {
    DetectorType.JUNGFRAU: JungfrauLayout,
    DetectorType.EIGER: EigerLayout,
    DetectorType.GIGAFROST: GigaFrostLayout,
}


def layout_for(config: DetectorConfig) -> DetectorLayout:
    """The layout of ``config``'s detector type (ConfigError if the config cannot be laid out)."""
    return _LAYOUTS[config.detector_type](config)


__all__ = [
    "DetectorLayout",
    "EigerLayout",
    "GfGeometry",
    "GigaFrostLayout",
    "JungfrauLayout",
    "PacketInfo",
    "PixelIndex",
    "layout_for",
    "load_pedestal_gain",
    "pack_12bit",
    "unpack_12bit",
]
