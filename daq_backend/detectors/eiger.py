"""Eiger: one UDP "module" is a half-module of 256 rows x 512 px (two 256x256 chips) at 8/16/32 bit,
4096-byte payloads (reference §2.2, §4.3).

A half-module occupies a 256 x 514 box in the image: chip 0, a 2-pixel chip gap (written as zeros),
chip 1. Module row *r* goes to image row ``start_y + r*dir_y`` — the bottom half of a physical
module has ``end_y < start_y`` and is stored flipped. A reversed x corner order mirrors the columns
the same way (not used by real configs, but the positions say so).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from daq_backend.config import EIGER_HALF_MODULE_SHAPE, DetectorConfig
from daq_backend.detectors.base import PacketInfo, PixelIndex, span
from daq_backend.detectors.sls import SLS_DETECTOR_TYPE, SlsLayout
from daq_backend.formats import EIGER_PAYLOAD

CHIP_WIDTH = 256
CHIP_GAP = 2
BOX_WIDTH = 2 * CHIP_WIDTH + CHIP_GAP  # 514


@dataclass(frozen=True)
class _Placement:
    rows: slice
    chip0: slice
    gap: slice
    chip1: slice
    columns: np.ndarray  # image column of every module column (gap excluded)


class EigerLayout(SlsLayout):
    bunchid_is_pulse_id = False
    sls_detector_type = SLS_DETECTOR_TYPE["eiger"]
    module_shape = EIGER_HALF_MODULE_SHAPE

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        self.raw_dtype = np.dtype(f"<u{config.bit_depth // 8}")
        rows, cols = self.module_shape
        frame_nbytes = rows * cols * self.raw_dtype.itemsize
        self._init_sizes(EIGER_PAYLOAD, frame_nbytes // EIGER_PAYLOAD)

    def image_id(self, info: PacketInfo) -> int:
        return info.frame_number

    @cached_property
    def _placements(self) -> dict[int, _Placement]:
        rows, _ = self.module_shape
        out = {}
        local = np.arange(2 * CHIP_WIDTH)
        for m, (x0, y0, x1, y1) in self.config.module_positions.items():
            dx = 1 if x1 >= x0 else -1
            dy = 1 if y1 >= y0 else -1
            columns = x0 + dx * (local + CHIP_GAP * (local >= CHIP_WIDTH))
            out[m] = _Placement(
                rows=span(y0, rows, dy),
                chip0=span(x0, CHIP_WIDTH, dx),
                gap=span(x0 + dx * CHIP_WIDTH, CHIP_GAP, dx),
                chip1=span(x0 + dx * (CHIP_WIDTH + CHIP_GAP), CHIP_WIDTH, dx),
                columns=columns.astype(np.intp),
            )
        return out

    def module_pixels(self, module_id: int) -> PixelIndex:
        self._check_module(module_id)
        p = self._placements[module_id]
        return (p.rows, p.columns)

    def zero_module(self, module_id: int, image: np.ndarray) -> None:
        self._check_module(module_id)
        p = self._placements[module_id]
        start = min(p.chip0.start, p.chip1.start)
        image[p.rows, start : start + BOX_WIDTH] = 0

    def assemble(self, module_id: int, frame: np.ndarray, image: np.ndarray) -> None:
        self._check_module(module_id)
        self._check_image(image)
        raw = self._frame_view(frame).view(self.raw_dtype).reshape(self.module_shape)
        p = self._placements[module_id]
        image[p.rows, p.chip0] = raw[:, :CHIP_WIDTH]
        image[p.rows, p.gap] = 0
        image[p.rows, p.chip1] = raw[:, CHIP_WIDTH:]
