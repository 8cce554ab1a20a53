"""Jungfrau: 1024x512 modules of 16-bit pixels in 128 packets (reference §2.1, §4.3, §4.4).

Modules go to their ``module_positions`` box (start -> end corner; a reversed corner order flips the
module, which the C++ converter ignored), or are stacked vertically when no positions are given.

Optional pedestal/gain conversion to float32 (``config.pedestal_gain_file``): an HDF5 file with the
float datasets ``pedestals`` and ``gains``, each shaped ``(3, image_height, image_width)`` — one plane
per gain stage G0, G1, G2, in *final-image* coordinates, so every module takes the parameters of the
pixels it lands on (the C++ converter indexed full-image arrays with module-local indices, weakness 11).
Per pixel: ``stage = min(raw >> 14, 2)`` (gain code 3 = binary 11 is G2; the C++ ``% 3`` mapped it to
G0; the invalid code 2 is treated as G2 too), ``adc = raw & 0x3FFF``,
``out = (adc - pedestal[stage]) * gain[stage]`` in float32.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from daq_backend.config import JUNGFRAU_MODULE_SHAPE, ConfigError, DetectorConfig, ImageIdSource
from daq_backend.detectors.base import PacketInfo, PixelIndex, span
from daq_backend.detectors.sls import SLS_DETECTOR_TYPE, SlsLayout
from daq_backend.formats import JUNGFRAU_PACKETS_PER_FRAME, JUNGFRAU_PAYLOAD

ADC_MASK = 0x3FFF
N_GAIN_STAGES = 3


def gain_stage(raw: np.ndarray) -> np.ndarray:
    """Gain-stage index 0..2 of raw Jungfrau pixels (codes 2 and 3 both mean G2)."""
    return np.minimum(raw >> 14, 2)


def load_pedestal_gain(path: str | Path, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(pedestals, gains) as float32 arrays of shape ``(3, H, W)``; ValueError names what is wrong."""
    expected = (N_GAIN_STAGES, *image_shape)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(f"pedestal_gain_file: cannot open {path}: {exc}") from None
    with f:
        out = []
        for name in ("pedestals", "gains"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise ConfigError(f"pedestal_gain_file: {path} has no dataset '{name}'")
            ds = f[name]
            if ds.shape != expected:
                raise ConfigError(
                    f"pedestal_gain_file: {path}:/{name} has shape {ds.shape}, expected {expected} "
                    "(gain stage, image rows, image columns)"
                )
            if not np.issubdtype(ds.dtype, np.number):
                raise ConfigError(f"pedestal_gain_file: {path}:/{name} is not numeric ({ds.dtype})")
            out.append(np.asarray(ds[()], dtype=np.float32))
    return out[0], out[1]


def convert(raw: np.ndarray, pedestals: np.ndarray, gains: np.ndarray, out: np.ndarray) -> None:
    """``out = (adc - pedestal[stage]) * gain[stage]`` for raw uint16 pixels.

    Starts from G0 and overwrites only where another stage occurs: detector images are mostly G0,
    which makes this several times faster than a per-pixel gather."""
    code = raw >> 14
    adc = np.bitwise_and(raw, ADC_MASK).astype(np.float32)
    ped = pedestals[0].copy()
    gain = gains[0].copy()
    for stage, mask in ((1, code == 1), (2, code >= 2)):
        if mask.any():
            np.copyto(ped, pedestals[stage], where=mask)
            np.copyto(gain, gains[stage], where=mask)
    np.subtract(adc, ped, out=adc)
    np.multiply(adc, gain, out=out)


class JungfrauLayout(SlsLayout):
    bunchid_is_pulse_id = True
    module_shape = JUNGFRAU_MODULE_SHAPE
    raw_dtype = np.dtype("<u2")

    sls_detector_type = SLS_DETECTOR_TYPE["jungfrau"]

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        self._init_sizes(JUNGFRAU_PAYLOAD, JUNGFRAU_PACKETS_PER_FRAME)
        self.pulse_id_used = config.image_id_source is not ImageIdSource.FRAME_INDEX

    def image_id(self, info: PacketInfo) -> int:
        source = self.config.image_id_source.value
        if source == "pulse_id" or (source == "auto" and info.pulse_id != 0):
            return info.pulse_id
        return info.frame_number

    def module_pixels(self, module_id: int) -> PixelIndex:
        self._check_module(module_id)
        return self._pixels[module_id]

    @cached_property
    def _pixels(self) -> dict[int, PixelIndex]:
        rows, cols = self.module_shape
        if not self.config.module_positions:
            n = self.config.n_modules
            return {m: (slice(m * rows, (m + 1) * rows), slice(0, cols)) for m in range(n)}
        out = {}
        for m, (x0, y0, x1, y1) in self.config.module_positions.items():
            out[m] = (span(y0, rows, 1 if y1 >= y0 else -1), span(x0, cols, 1 if x1 >= x0 else -1))
        return out

    @cached_property
    def _parameters(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per module: contiguous (pedestals, gains) of shape (3, 512, 1024) in module-local order."""
        path = self.config.pedestal_gain_file
        assert path is not None
        pedestals, gains = load_pedestal_gain(path, self.config.image_shape)
        out = {}
        for m in self.config.required_modules:
            idx = (slice(None), *self.module_pixels(m))
            out[m] = (np.ascontiguousarray(pedestals[idx]), np.ascontiguousarray(gains[idx]))
        return out

    def prepare(self) -> None:
        super().prepare()
        if self.config.converted:
            _ = self._parameters

    def zero_module(self, module_id: int, image: np.ndarray) -> None:
        """A module frame that never arrived: 0 in raw images, NaN in converted ones (a converted 0
        would be a plausible value)."""
        image[self.module_pixels(module_id)] = np.nan if self.config.converted else 0

    def mark_missing_packets(self, module_id: int, received: np.ndarray, image: np.ndarray) -> None:
        """Converted images: the rows of every lost packet become NaN (each packet is 4 whole rows).
        Raw images keep the receiver's zeros."""
        if not self.config.converted:
            return
        rows_per_packet = self.module_shape[0] // self.packets_per_frame
        dst = image[self.module_pixels(module_id)]  # a view: module_pixels are slices
        for k in np.flatnonzero(~received[: self.packets_per_frame]):
            dst[k * rows_per_packet : (k + 1) * rows_per_packet] = np.nan

    def assemble(self, module_id: int, frame: np.ndarray, image: np.ndarray) -> None:
        self._check_image(image)
        raw = self._frame_view(frame).view(self.raw_dtype).reshape(self.module_shape)
        dst = image[self.module_pixels(module_id)]
        if self.config.converted:
            pedestals, gains = self._parameters[module_id]
            convert(raw, pedestals, gains, out=dst)
        else:
            dst[...] = raw
