"""Jungfrau: 1024x512 modules of 16-bit pixels in 128 packets (reference §2.1, §4.3, §4.4).

Modules go to their ``module_positions`` box (start -> end corner; a reversed corner order flips the
module, which the C++ converter ignored), or are stacked vertically when no positions are given.

A module is 2 x 4 chips of 256 x 256 pixels; the pixels at a chip border are double (quadruple at
the corners) size. With ``gap_pixels`` the image gets jungfrau_utils' 2-pixel gap between
neighbouring chips (module-local pixel ``(r, c)`` goes to ``(r + 2*(r // 256), c + 2*(c // 256))``
of a 514 x 1030 box, the gap pixels stay 0 like jungfrau_utils' and like the gaps between modules),
so every image pixel is the 75 um pitch of the sensor and positions in the image are true positions.

Optional conversion to keV in float32 with either calibration layout (``calibration.py`` describes
both files and the formulas): ``pedestal_gain_file`` (one file, image coordinates, gains as
multipliers; the C++ converter indexed full-image arrays with module-local indices and mapped gain
code 3 to G0, weakness 11) or jungfrau_utils' ``gain_file`` + ``pedestal_file`` (module
coordinates, ``(adc - P[g]) / G[g]``, ``high_gain`` mode, masked pixels NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from daq_backend.config import JUNGFRAU_MODULE_SHAPE, DetectorConfig, ImageIdSource
from daq_backend.detectors.base import PacketInfo, PixelIndex, span
from daq_backend.detectors.calibration import (
    ADC_MASK,
    N_GAIN_STAGES,
    ModuleTables,
    convert,
    gain_stage,
    jf_utils_tables,
    load_jf_utils,
    load_pedestal_gain,
)
from daq_backend.detectors.sls import SLS_DETECTOR_TYPE, SlsLayout
from daq_backend.formats import JUNGFRAU_PACKETS_PER_FRAME, JUNGFRAU_PAYLOAD

CHIP_SIZE = 256
CHIP_GAP = 2

__all__ = ["ADC_MASK", "N_GAIN_STAGES", "JungfrauLayout", "convert", "gain_stage", "load_pedestal_gain"]


@dataclass(frozen=True)
class _Placement:
    """Where one module's pixels go: the image row of every module row and the image column of
    every module column, and the module as blocks copied with slices (the whole module, or one
    block per chip when gap pixels separate them)."""

    rows: np.ndarray
    cols: np.ndarray
    index: PixelIndex
    blocks: tuple[tuple[tuple[slice, slice], tuple[slice, slice]], ...]


def _axis(start: int, n: int, step: int, gaps: bool) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """Image coordinates of ``n`` module-local pixels along one axis, and (module, image) slices
    of its contiguous runs (one per chip with gaps)."""
    local = np.arange(n)
    shift = CHIP_GAP * (local // CHIP_SIZE) if gaps else 0
    coords = (start + step * (local + shift)).astype(np.intp)
    if not gaps:
        return coords, [(slice(0, n), span(start, n, step))]
    runs = []
    for chip in range(n // CHIP_SIZE):
        first = chip * CHIP_SIZE
        runs.append((slice(first, first + CHIP_SIZE), span(int(coords[first]), CHIP_SIZE, step)))
    return coords, runs


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
        return self._placements[module_id].index

    @cached_property
    def _placements(self) -> dict[int, _Placement]:
        rows, cols = self.module_shape
        box_rows = self.config.jungfrau_module_box[0]
        gaps = self.config.gap_pixels
        if self.config.module_positions:
            corners = self.config.module_positions
        else:
            corners = {m: (0, m * box_rows, 0, m * box_rows) for m in range(self.config.n_modules)}
        out = {}
        for m, (x0, y0, x1, y1) in corners.items():
            r, row_runs = _axis(y0, rows, 1 if y1 >= y0 else -1, gaps)
            c, col_runs = _axis(x0, cols, 1 if x1 >= x0 else -1, gaps)
            blocks = tuple(((rs, cs), (rd, cd)) for rs, rd in row_runs for cs, cd in col_runs)
            index: PixelIndex = blocks[0][1] if not gaps else (r[:, None], c[None, :])
            out[m] = _Placement(r, c, index, blocks)
        return out

    @cached_property
    def _parameters(self) -> dict[int, ModuleTables]:
        """Per module: contiguous conversion tables in module-local order."""
        config = self.config
        out = {}
        if config.pedestal_gain_file is not None:
            pedestals, gains = load_pedestal_gain(config.pedestal_gain_file, config.image_shape)
            for m in config.required_modules:
                p = self._placements[m]
                idx = (slice(None), p.rows[:, None], p.cols[None, :])
                out[m] = ModuleTables(np.ascontiguousarray(pedestals[idx]), np.ascontiguousarray(gains[idx]))
            return out
        assert config.gain_file is not None and config.pedestal_file is not None
        gains, pedestals, mask = load_jf_utils(config.gain_file, config.pedestal_file, config.n_modules)
        for m in config.required_modules:
            out[m] = jf_utils_tables(gains, pedestals, mask, m, config.high_gain)
        return out

    @cached_property
    def _scratch(self) -> np.ndarray:
        """A module-sized float32 buffer: a module split by gap pixels is converted here first."""
        return np.empty(self.module_shape, dtype=np.float32)

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
        self._check_module(module_id)
        p = self._placements[module_id]
        rows_per_packet = self.module_shape[0] // self.packets_per_frame
        for k in np.flatnonzero(~received[: self.packets_per_frame]):
            rows = p.rows[k * rows_per_packet : (k + 1) * rows_per_packet]
            image[rows[:, None], p.cols[None, :]] = np.nan

    def assemble(self, module_id: int, frame: np.ndarray, image: np.ndarray) -> None:
        self._check_image(image)
        self._check_module(module_id)
        raw = self._frame_view(frame).view(self.raw_dtype).reshape(self.module_shape)
        blocks = self._placements[module_id].blocks
        if not self.config.converted:
            for src, dst in blocks:
                image[dst] = raw[src]
            return
        tables = self._parameters[module_id]
        if len(blocks) == 1:
            convert(raw, tables.pedestals, tables.factors, out=image[blocks[0][1]])
            return
        scratch = self._scratch
        convert(raw, tables.pedestals, tables.factors, out=scratch)
        for src, dst in blocks:
            image[dst] = scratch[src]
