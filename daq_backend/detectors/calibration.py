"""Jungfrau calibration: the two pedestal/gain file layouts and the conversion of raw pixels to keV.

A raw Jungfrau pixel is 16 bits: the gain code in the two top bits (``raw >> 14``), the ADC value in
the low 14 (``raw & 0x3FFF``). Gain code 0 is G0, 1 is G1, 3 is G2; code 2 does not occur in a
working detector and is converted with G2 (as both layouts below do).

Single-file layout (``pedestal_gain_file``), this project's own: one HDF5 file with the float
datasets ``pedestals`` and ``gains``, each ``(3, image_height, image_width)`` — planes G0, G1, G2 in
*final-image* coordinates, so every module takes the parameters of the pixels it lands on.
``gains`` are multipliers (keV per ADU): ``E = (adc - pedestal[g]) * gain[g]``.

jungfrau_utils layout (``gain_file`` + ``pedestal_file``), as PSI ships it and as
``jungfrau_utils.JFDataHandler`` (``jungfrau_utils/data_handler.py``) reads it:

* gain file: ``/gains`` shaped ``(4, 512 * n_modules, 1024)``, planes G0, G1, G2, HG0, in ADU per
  keV (the gain of the pixel's amplifier, so the conversion divides by it);
* pedestal file: ``/gains`` shaped like the gain file, the pedestal in ADU of G0, G1, G2, HG0 (the
  name ``gains`` for pedestals is jungfrau_utils' own), and ``/pixel_mask`` shaped
  ``(512 * n_modules, 1024)``: non-zero marks a bad pixel (jungfrau_create_pedestals sets bit
  ``gain`` where the pixel was not in the gain the pedestal run forced: bit 0 G0, bit 1 G1, bit 3
  G2, bit 4 HG0; bit 2 = the invalid gain code 2);
* both in *module* coordinates: module ``m`` is rows ``m*512 .. m*512+511`` in the order it is read
  out, whatever its place in the image (``module_positions``) and with no gap pixels;
* ``E = (adc - P[g]) / G[g]`` keV, computed like jungfrau_utils as ``(adc - P[g]) * (1 / G[g])``
  in float32 (it stacks the planes as (G0, G1, G2, G2), indexed by the gain code), so the numbers
  are the ones jungfrau_utils gives;
* high-gain mode (``high_gain``, the detector runs with HG0 switched on): every pixel is converted
  with the HG0 planes whatever its gain bits, ``E = (adc - P[3]) / G[3]`` (jungfrau_utils'
  ``highgain = True`` with a 4-plane file);
* jungfrau_utils also reads a later variant (gains ``(6, ...)`` with HG0, HG1, HG2 for high-gain
  mode, pedestals ``(3, ...)``); it is refused here with the expected shape, not guessed at;
* masked pixels are NaN. jungfrau_utils writes 0 for them; here a 0 would look like a real pixel
  with no signal, and missing pixels are NaN in converted images already. A pixel whose gain is 0
  (it cannot be converted; jungfrau_utils would give an infinite energy) is NaN too.

The mask is applied for free: a masked pixel's pedestals are NaN, and ``adc - NaN`` is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from daq_backend.config import JUNGFRAU_MODULE_SHAPE, ConfigError, DetectorConfig

ADC_MASK = 0x3FFF
N_GAIN_STAGES = 3
#: planes of a jungfrau_utils gain or pedestal file: G0, G1, G2, HG0
JF_UTILS_PLANES = 4
HG0 = 3


@dataclass(frozen=True)
class ModuleTables:
    """Per module, in module-local order: ``pedestals`` and ``factors`` (keV per ADU), float32
    ``(S, 512, 1024)`` with S = 3 planes (G0, G1, G2, chosen by the gain code) or 1 plane (used
    for every pixel: high-gain mode). Masked pixels have NaN pedestals."""

    pedestals: np.ndarray
    factors: np.ndarray


def gain_stage(raw: np.ndarray) -> np.ndarray:
    """Gain-stage index 0..2 of raw Jungfrau pixels (codes 2 and 3 both mean G2)."""
    return np.minimum(raw >> 14, 2)


def convert(raw: np.ndarray, pedestals: np.ndarray, factors: np.ndarray, out: np.ndarray) -> None:
    """``out = (adc - pedestals[stage]) * factors[stage]`` for raw uint16 pixels, in float32.

    ``pedestals``/``factors`` have 3 planes (stage = gain code, codes 2 and 3 -> G2) or 1 (every
    pixel uses it). ``out`` may be any view (flipped modules write through negative strides).
    Detector images are mostly G0: the whole frame is converted with G0 in two passes, then only
    the pixels of another gain code are recomputed from their own parameters (a gather of the few
    pixels, instead of selecting per-pixel parameters over the whole frame)."""
    adc = np.bitwise_and(raw, ADC_MASK)
    np.subtract(adc, pedestals[0], out=out)
    np.multiply(out, factors[0], out=out)
    if pedestals.shape[0] == 1:
        return
    flat = raw.reshape(-1)
    idx = np.flatnonzero(flat >= 1 << 14)  # a bool array: numpy's nonzero is several times faster on it
    if not idx.size:
        return
    stage = np.minimum(flat[idx] >> 14, N_GAIN_STAGES - 1)
    n_planes = pedestals.shape[0]
    values = adc.reshape(-1)[idx].astype(np.float32)
    values -= pedestals.reshape(n_planes, -1)[stage, idx]
    values *= factors.reshape(n_planes, -1)[stage, idx]
    rows, cols = np.divmod(idx, raw.shape[1])
    out[rows, cols] = values


def _open(field: str, path: str | Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(f"{field}: cannot open {path}: {exc}") from None


def _dataset(field: str, f: h5py.File, name: str, shape: tuple[int, ...], meaning: str) -> np.ndarray:
    """The numeric dataset ``name`` of shape ``shape`` as float32; ConfigError names field and file."""
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise ConfigError(f"{field}: {f.filename} has no dataset '{name}'")
    ds = f[name]
    if ds.shape != shape:
        raise ConfigError(f"{field}: {f.filename}:/{name} has shape {ds.shape}, expected {shape} ({meaning})")
    if not np.issubdtype(ds.dtype, np.number):
        raise ConfigError(f"{field}: {f.filename}:/{name} is not numeric ({ds.dtype})")
    return np.asarray(ds[()])


def load_pedestal_gain(path: str | Path, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Single-file layout: (pedestals, gains) as float32 arrays of shape ``(3, H, W)``."""
    expected = (N_GAIN_STAGES, *image_shape)
    meaning = "gain stage, image rows, image columns"
    with _open("pedestal_gain_file", path) as f:
        pedestals = _dataset("pedestal_gain_file", f, "pedestals", expected, meaning)
        gains = _dataset("pedestal_gain_file", f, "gains", expected, meaning)
    return pedestals.astype(np.float32), gains.astype(np.float32)


def jf_utils_shape(n_modules: int) -> tuple[int, int]:
    """(rows, columns) of jungfrau_utils' per-pixel arrays: the modules stacked in module order."""
    rows, cols = JUNGFRAU_MODULE_SHAPE
    return rows * n_modules, cols


def load_jf_utils(gain_file: str | Path, pedestal_file: str | Path,
                  n_modules: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """jungfrau_utils layout: (gains, pedestals, pixel_mask) — float32 ``(4, 512*n, 1024)`` twice
    and the raw ``(512*n, 1024)`` mask; ConfigError names the field, the file and what is wrong."""
    shape = jf_utils_shape(n_modules)
    planes = (JF_UTILS_PLANES, *shape)
    meaning = f"planes G0, G1, G2, HG0 of {n_modules} module(s) stacked in module order"
    with _open("gain_file", gain_file) as f:
        gains = _dataset("gain_file", f, "gains", planes, meaning).astype(np.float32)
    with _open("pedestal_file", pedestal_file) as f:
        pedestals = _dataset("pedestal_file", f, "gains", planes, meaning).astype(np.float32)
        mask = _dataset("pedestal_file", f, "pixel_mask", shape, "module rows stacked, columns")
    if not np.issubdtype(mask.dtype, np.integer) and not np.issubdtype(mask.dtype, np.bool_):
        raise ConfigError(f"pedestal_file: {pedestal_file}:/pixel_mask must hold integers, got {mask.dtype}")
    return gains, pedestals, mask


def jf_utils_tables(gains: np.ndarray, pedestals: np.ndarray, mask: np.ndarray, module: int,
                    high_gain: bool) -> ModuleTables:
    """Module ``module``'s conversion tables from jungfrau_utils arrays (see the module docstring)."""
    rows = slice(module * JUNGFRAU_MODULE_SHAPE[0], (module + 1) * JUNGFRAU_MODULE_SHAPE[0])
    planes = slice(HG0, HG0 + 1) if high_gain else slice(0, N_GAIN_STAGES)
    g = gains[planes, rows]
    with np.errstate(divide="ignore"):
        factors = np.ascontiguousarray(np.float32(1) / g)
    ped = np.array(pedestals[planes, rows], dtype=np.float32)
    ped[:, mask[rows] != 0] = np.nan
    ped[~np.isfinite(factors)] = np.nan  # a zero gain cannot convert: NaN, not an infinite energy
    return ModuleTables(ped, factors)


@lru_cache(maxsize=4)
def _jf_utils_mask(pedestal_file: str, n_modules: int) -> np.ndarray:
    shape = jf_utils_shape(n_modules)
    with _open("pedestal_file", pedestal_file) as f:
        mask = _dataset("pedestal_file", f, "pixel_mask", shape, "module rows stacked, columns")
    out = mask != 0
    out.flags.writeable = False
    return out


def bad_pixels(config: DetectorConfig, module: int) -> np.ndarray | None:
    """Module-local bool mask of the pixels the calibration marks bad (jungfrau_utils layout), or
    None when the configured calibration carries no mask. Read once per file and process."""
    if config.pedestal_file is None:
        return None
    mask = _jf_utils_mask(config.pedestal_file, config.n_modules)
    rows = JUNGFRAU_MODULE_SHAPE[0]
    return mask[module * rows : (module + 1) * rows]
