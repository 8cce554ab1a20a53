"""The simulator's pixel pattern: a value a test can predict from (image id, module, pixel).

Raw value of module-local pixel *p* (wire order, row-major) of module *m* in image *i*::

    v = (7*i + 131*m + p) % M

with a prime ``M`` below the pixel range (so rows and modules differ even at 8 bit). The stored raw
word is ``v`` except: 32-bit Eiger stores ``v * 65537`` (both 16-bit halves used), and a Jungfrau
with pedestal/gain conversion stores ``v | (v % 4) << 14`` so every gain code 0..3 occurs.
With ``gap_pixels`` a Jungfrau module's pixels are placed with jungfrau_utils' 2-pixel chip gaps.

Because the pattern of image *i* is the pattern of image 0 shifted by ``7*i`` pixels, one precomputed
sequence per module serves every image as a zero-copy slice, which lets the simulator send at the
loopback limit. ``expected_image`` places the values with its own index arithmetic (not the
layouts' slicing), so comparing it with the assembler's output checks the geometry twice.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from daq_backend.config import DetectorConfig, DetectorType, ImageIdSource
from daq_backend.detectors import layout_for, load_pedestal_gain, pack_12bit
from daq_backend.detectors.calibration import load_jf_utils
from daq_backend.detectors.jungfrau import ADC_MASK, gain_stage

IMAGE_STEP = 7
MODULE_STEP = 131


def pattern_modulus(config: DetectorConfig) -> int:
    if config.detector_type is DetectorType.GIGAFROST:
        return 4093
    if config.detector_type is DetectorType.JUNGFRAU:
        return 16381  # < 2**14: the gain bits stay free
    return {8: 251, 16: 65521, 32: 65521}[config.bit_depth]


class PatternSource:
    """Per-module precomputed sequences; ``frame_bytes`` returns read-only views into them."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.layout = layout_for(config)
        self.modulus = pattern_modulus(config)
        self.n_pixels = self.layout.module_shape[0] * self.layout.module_shape[1]
        self._sequences: dict[int, np.ndarray] = {}
        self._packed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bases: dict[tuple[int, ...], np.ndarray] = {}

    def _offset(self, module_id: int, image_id: int) -> int:
        if image_id < 0:
            raise ValueError(f"image id must be >= 0, got {image_id}")
        return (IMAGE_STEP * image_id) % self.modulus

    def _sequence(self, module_id: int) -> np.ndarray:
        seq = self._sequences.get(module_id)
        if seq is None:
            n = self.n_pixels + self.modulus + 2
            v = (MODULE_STEP * module_id + np.arange(n, dtype=np.uint64)) % self.modulus
            seq = encode_raw(self.config, v).astype(self.layout.raw_dtype)
            seq.flags.writeable = False
            self._sequences[module_id] = seq
        return seq

    def module_values(self, module_id: int, image_id: int) -> np.ndarray:
        """Raw pixel values of one module frame, shaped ``layout.module_shape`` (read-only view)."""
        off = self._offset(module_id, image_id)
        return self._sequence(module_id)[off : off + self.n_pixels].reshape(self.layout.module_shape)

    def frame_bytes(self, module_id: int, image_id: int) -> np.ndarray:
        """The module frame as stored in the frame ring: uint8, ``layout.frame_nbytes`` long."""
        if self.config.detector_type is not DetectorType.GIGAFROST:
            return self.module_values(module_id, image_id).reshape(-1).view(np.uint8)
        packed = self._packed.get(module_id)
        if packed is None:
            seq = self._sequence(module_id)
            usable = (seq.size - 1) // 2 * 2
            packed = (pack_12bit(seq[:usable]), pack_12bit(seq[1 : usable + 1]))
            for p in packed:
                p.flags.writeable = False
            self._packed[module_id] = packed
        off = self._offset(module_id, image_id)
        start = off // 2 * 3
        return packed[off % 2][start : start + self.layout.frame_nbytes]

    def address_table(self, module_ids: tuple[int, ...], image_ids: np.ndarray) -> np.ndarray:
        """``frame_addresses`` of every module for every image at once: shape (images, modules).
        The image's offset into the pattern does not depend on the module, so this is one
        broadcast over per-module base addresses (cached per module tuple)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"image ids must be >= 0, got {int(ids.min())}")
        bases = self._bases.get(module_ids)
        if bases is None:
            bases = self._bases[module_ids] = np.stack(
                [self.frame_addresses(m, np.array([0, 1])) for m in module_ids], axis=1)
        off = (IMAGE_STEP * ids) % self.modulus
        if self.config.detector_type is not DetectorType.GIGAFROST:
            step = np.uint64(self.layout.raw_dtype.itemsize)
            return bases[0][None, :] + (off.astype(np.uint64) * step)[:, None]
        # bases[0]: offset 0 (even sequence), bases[1]: offset 7 (odd sequence, start 7 // 2 * 3)
        odd_base = bases[1] - np.uint64(IMAGE_STEP // 2 * 3)
        parity = (off % 2 == 1)[:, None]
        starts = (off // 2 * 3).astype(np.uint64)[:, None]
        return np.where(parity, odd_base[None, :], bases[0][None, :]) + starts

    def frame_addresses(self, module_id: int, image_ids: np.ndarray) -> np.ndarray:
        """Memory address of ``frame_bytes(module_id, i)``'s first byte for every ``i`` of
        ``image_ids`` (uint64), computed for all of them at once. The memory belongs to this
        source: it stays valid as long as the source lives."""
        ids = np.asarray(image_ids, dtype=np.int64)
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"image ids must be >= 0, got {int(ids.min())}")
        off = (IMAGE_STEP * ids) % self.modulus
        if self.config.detector_type is not DetectorType.GIGAFROST:
            seq = self._sequence(module_id)
            base = np.uint64(seq.__array_interface__["data"][0])
            return base + off.astype(np.uint64) * np.uint64(seq.itemsize)
        self.frame_bytes(module_id, 0)  # builds the packed sequences
        even, odd = (np.uint64(p.__array_interface__["data"][0]) for p in self._packed[module_id])
        bases = np.where(off % 2 == 0, even, odd)
        return bases + (off // 2 * 3).astype(np.uint64)


def encode_raw(config: DetectorConfig, v: np.ndarray) -> np.ndarray:
    """Pattern value -> raw wire word (see the module docstring)."""
    if config.detector_type is DetectorType.EIGER and config.bit_depth == 32:
        return v * 65537
    if config.converted:
        return v | (v % 4) << 14
    return v


@lru_cache(maxsize=16)
def _source(config_json: str) -> PatternSource:
    return PatternSource(DetectorConfig.model_validate_json(config_json))


def pattern_source(config: DetectorConfig) -> PatternSource:
    """A cached PatternSource (building the sequences costs milliseconds per module)."""
    return _source(config.model_dump_json())


def module_frame_bytes(config: DetectorConfig, module_id: int, image_id: int) -> bytes:
    """What a receiver stores for this module frame when no packet is lost."""
    return pattern_source(config).frame_bytes(module_id, image_id).tobytes()


def header_ids(config: DetectorConfig, image_id: int) -> tuple[int, int]:
    """(frame_number, pulse_id) a detector sends so the pipeline derives ``image_id``: the frame
    number always equals the image id; the pulse id too when the config reads ids from pulse ids."""
    pulse_id = image_id if config.image_id_source is ImageIdSource.PULSE_ID else 0
    return image_id, pulse_id


def header_id_arrays(config: DetectorConfig, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`header_ids` of many images at once: (frame numbers, pulse ids), uint64."""
    ids = np.asarray(image_ids, dtype=np.uint64)
    pulse = ids if config.image_id_source is ImageIdSource.PULSE_ID else np.zeros_like(ids)
    return ids, pulse


def module_datagrams(
    config: DetectorConfig, module_id: int, image_id: int,
    frame_number: int | None = None, pulse_id: int | None = None,
) -> list[bytes]:
    """Complete UDP datagrams of one module frame carrying image ``image_id``'s pattern.

    ``frame_number``/``pulse_id`` default to :func:`header_ids`."""
    default_frame, default_pulse = header_ids(config, image_id)
    source = pattern_source(config)
    return source.layout.encode_datagrams(
        module_id, source.frame_bytes(module_id, image_id),
        default_frame if frame_number is None else frame_number,
        default_pulse if pulse_id is None else pulse_id,
    )


def module_coordinates(config: DetectorConfig, module_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (row, column) of every module-local pixel, from the reference formulas (§4.3)."""
    shape = layout_for(config).module_shape
    r, c = np.indices(shape)
    h, w = config.image_shape
    if config.detector_type is DetectorType.GIGAFROST:
        quadrant, odd = divmod(module_id % 8, 2)
        ys = h // 2 + odd + 2 * r if quadrant < 2 else h // 2 - 1 - odd - 2 * r
        xs = c + (w // 2 if quadrant % 2 else 0)
        return ys, xs
    if config.gap_pixels:  # jungfrau_utils' 2-pixel gaps between 256x256 chips
        r, c = r + 2 * (r // 256), c + 2 * (c // 256)
    if not config.module_positions:
        return config.jungfrau_module_box[0] * module_id + r, c
    x0, y0, x1, y1 = config.module_positions[module_id]
    dx = -1 if x1 < x0 else 1
    dy = -1 if y1 < y0 else 1
    if config.detector_type is DetectorType.EIGER:
        c = c + 2 * (c >= 256)  # 2-pixel chip gap
    return y0 + dy * r, x0 + dx * c


def expected_image(config: DetectorConfig, image_id: int) -> np.ndarray:
    """The final image the pipeline must produce for ``image_id`` (gap pixels 0)."""
    source = pattern_source(config)
    image = np.zeros(config.image_shape, dtype=config.image_dtype)
    params = None
    if config.pedestal_gain_file is not None:
        params = load_pedestal_gain(config.pedestal_gain_file, config.image_shape)
    elif config.gain_file is not None and config.pedestal_file is not None:
        jf_utils = load_jf_utils(config.gain_file, config.pedestal_file, config.n_modules)
    for module_id in config.required_modules:
        ys, xs = module_coordinates(config, module_id)
        raw = source.module_values(module_id, image_id)
        adc = (raw & ADC_MASK).astype(np.float32)
        if not config.converted:
            image[ys, xs] = raw
        elif params is not None:
            pedestals, gains = params
            stage = gain_stage(raw)
            image[ys, xs] = (adc - pedestals[stage, ys, xs]) * gains[stage, ys, xs]
        else:  # jungfrau_utils: module coordinates, (adc - P[g]) / G[g], HG0 planes in high gain
            gains, pedestals, mask = jf_utils
            r, c = np.indices(raw.shape)
            r = r + 512 * module_id
            stage = np.full(raw.shape, 3) if config.high_gain else gain_stage(raw)
            energy = (adc - pedestals[stage, r, c]) * (np.float32(1) / gains[stage, r, c])
            energy[mask[r, c] != 0] = np.nan
            image[ys, xs] = energy
    return image
