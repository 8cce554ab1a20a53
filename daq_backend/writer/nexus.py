"""NeXus NXmx metadata of a detector file: what the detector is, how its pixels lie, how it was timed.

Written by :func:`write_nexus` while the file is built (before SWMR mode, like every object of the
layout)::

    /entry
        start_time, end_time_estimated   ISO 8601 (estimate: start + n_images * max(period, exptime))
        definition = "NXmx"              only when the request's metadata has an ``nxmx`` object
        title                            nxmx.title, if given
        sample (NXsample)                name = nxmx.sample_name, depends_on = "." (no goniometer known)
        source (NXsource)                name = nxmx.source_name
    /entry/data (NXdata)                 signal = "data", axes = ["image_id", ".", "."]; data in keV
                                         (``units``) when a Jungfrau calibration converts it
    /entry/instrument                    name = nxmx.instrument_name, time_zone (UTC offset of start)
        beam (NXbeam)                    incident_wavelength = nxmx.incident_wavelength (angstrom)
    /entry/instrument/detector (NXdetector)
        description                      the detector type
        data                             hard link to /entry/data/data
        x_pixel_size, y_pixel_size (m)   from the type (Jungfrau, Eiger: 75 um) or pixel_size_um
        sensor_material, sensor_thickness (m)   from the type (Si, 320 um) or the config fields
        bit_depth_readout, saturation_value     from the type and bit_depth, where one value holds
        count_time, frame_time (s)       the request metadata's exptime and period (the ophyd
                                         devices put them there), if given
        pixel_mask (H, W) uint32         NXmx bits: 0 = gap (no sensor: between modules, chips),
                                         1 = bad in the calibration's pixel_mask (jungfrau_utils files)
        pixel_mask_applied               True when those pixels are NaN in the data (converted Jungfrau)
        distance, beam_center_x/y        nxmx.detector_distance (m), nxmx.beam_center_x/y (pixels)
        depends_on                       "transformations/translation" (the distance along the beam)
                                         when the distance is known, else "." (position unknown)
        transformations (NXtransformations)
            translation                  nxmx.detector_distance along +z (the beam)
        module_<m> (NXdetector_module)   one per module: data_origin/data_size (its box in the image,
                                         gap pixels included), module_offset (its first pixel relative
                                         to the beam centre), fast/slow_pixel_direction (pixel pitch
                                         along -x/-y of the NeXus frame: image columns run to -x, rows
                                         downwards)

The request metadata carries what the DAQ cannot know. ``nxmx`` (an object, checked when the request
is validated, unknown keys refused) makes the file claim the NXmx application definition, which needs
``sample_name``, ``instrument_name``, ``source_name``, ``incident_wavelength`` (angstrom) and
``detector_distance`` (m); ``beam_center_x``/``beam_center_y`` (pixels, default the image centre)
and ``title`` are optional. Without it the file is plain NeXus (NXentry/NXinstrument/NXdetector/
NXdata base classes) with every detector field above that is known.

Sources of the per-type values: Jungfrau pixel pitch 75 um, 256 x 256-pixel chips, 320 um Si sensors
(450 um also made): the European XFEL JUNGFRAU detector documentation ("General Introduction") and
Mozzanica et al. via the Jungfrau-1M at Diamond paper (J. Synchrotron Rad. 2026); EIGER ASIC 75 um
pixels with a 12-bit counter (32-bit images are sums of 12-bit frames): DECTRIS' EIGER ASIC pages;
PSI's detectors are optimised for 0.3-1 mm Si sensors (psi.ch, Detectors Group projects), 320 um is
the common thickness and a config field overrides it. GigaFRoST is a camera behind a scintillator
and microscope optics (Mokso et al., J. Synchrotron Rad. 24, 1250 (2017)): its pixel size at the
sample and its sensor (the scintillator) depend on the optics in use, so they come from the config
(``pixel_size_um``, ``sensor_material``, ``sensor_thickness_um``) or are left out; its pixels are
12-bit (saturation 4095).
"""

from __future__ import annotations

import datetime as dt
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daq_backend.config import DetectorConfig, DetectorType
from daq_backend.validation import explain

ENTRY = "/entry"
DATA_GROUP = "/entry/data"
DATA = "/entry/data/data"
INSTRUMENT = "/entry/instrument"
DETECTOR = "/entry/instrument/detector"
TRANSFORMATIONS = f"{DETECTOR}/transformations"
DETECTOR_TRANSLATION = f"{TRANSFORMATIONS}/translation"

#: NXmx pixel_mask bits
MASK_GAP = 1 << 0
MASK_BAD = 1 << 1

METADATA_KEY = "nxmx"


class NxmxMetadata(BaseModel):
    """The request metadata's ``nxmx`` object: what NXmx needs beyond the detector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_name: str = Field(min_length=1)
    instrument_name: str = Field(min_length=1, description="beamline, e.g. X06SA")
    source_name: str = Field(min_length=1, description="facility, e.g. Swiss Light Source")
    incident_wavelength: float = Field(gt=0, lt=1e4, description="angstrom")
    detector_distance: float = Field(gt=0, lt=1e3, description="sample to detector along the beam, m")
    beam_center_x: float | None = Field(default=None, description="pixels (image column)")
    beam_center_y: float | None = Field(default=None, description="pixels (image row)")
    title: str | None = None


class _WithNxmx(BaseModel):
    """Validates ``{"nxmx": ...}`` so errors read ``nxmx.<field>: ...``."""

    nxmx: NxmxMetadata


def _seconds(metadata: dict[str, Any], key: str, *, zero_ok: bool) -> float | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
            value < 0 if zero_ok else value <= 0):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{key}: must be a number of seconds {bound} (stored as NXmx "
                         f"{'frame_time' if key == 'period' else 'count_time'}), got {value!r}")
    return float(value)


def check_request_metadata(metadata: dict[str, Any]) -> None:
    """Refuse request metadata this module cannot store: a bad ``nxmx`` object (the message names
    ``nxmx.<field>``) or a non-numeric ``exptime``/``period``. Raises ValueError."""
    nxmx_metadata(metadata)
    _seconds(metadata, "exptime", zero_ok=False)
    _seconds(metadata, "period", zero_ok=True)


def nxmx_metadata(metadata: dict[str, Any]) -> NxmxMetadata | None:
    value = metadata.get(METADATA_KEY)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{METADATA_KEY}: expected an object with sample_name, instrument_name, "
                         f"source_name, incident_wavelength, detector_distance; got {type(value).__name__}")
    try:
        return _WithNxmx.model_validate({METADATA_KEY: value}).nxmx
    except ValidationError as exc:
        raise ValueError(explain(exc, METADATA_KEY)) from None


@dataclass(frozen=True)
class DetectorModel:
    """What the detector type (and the config's overrides) says about the hardware."""

    description: str
    pixel_size_um: float | None
    sensor_material: str | None
    sensor_thickness_um: float | None
    bit_depth_readout: int
    saturation_value: int | None


def detector_model(config: DetectorConfig) -> DetectorModel:
    kind = config.detector_type
    if kind is DetectorType.JUNGFRAU:
        # adaptive gain: no single raw value marks saturation, converted pixels are keV
        base = DetectorModel("PSI JUNGFRAU (charge integrating, dynamic gain switching)", 75.0, "Si", 320.0,
                             16, None)
    elif kind is DetectorType.EIGER:
        saturation = {8: 255, 16: 4095}.get(config.bit_depth)  # 12-bit counter; 32 bit = summed frames
        base = DetectorModel("PSI EIGER (single photon counting)", 75.0, "Si", 320.0, config.bit_depth,
                             saturation)
    else:
        base = DetectorModel("PSI GigaFRoST (CMOS camera, scintillator and optics)", None, None, None,
                             12, 4095)
    return DetectorModel(
        base.description,
        config.pixel_size_um if config.pixel_size_um is not None else base.pixel_size_um,
        config.sensor_material if config.sensor_material is not None else base.sensor_material,
        config.sensor_thickness_um if config.sensor_thickness_um is not None else base.sensor_thickness_um,
        base.bit_depth_readout,
        base.saturation_value,
    )


@dataclass(frozen=True)
class ModuleBox:
    """A module's box in the image: first row/column and size (gap pixels inside it included)."""

    name: str
    origin: tuple[int, int]
    size: tuple[int, int]


def module_boxes(config: DetectorConfig) -> list[ModuleBox]:
    if config.detector_type is DetectorType.GIGAFROST:  # 8 links interleave rows of one sensor
        return [ModuleBox("module_0", (0, 0), config.image_shape)]
    if not config.module_positions:
        rows, cols = config.jungfrau_module_box
        return [ModuleBox(f"module_{m}", (m * rows, 0), (rows, cols)) for m in range(config.n_modules)]
    out = []
    for m in sorted(config.module_positions):
        x0, y0, x1, y1 = config.module_positions[m]
        out.append(ModuleBox(f"module_{m}", (min(y0, y1), min(x0, x1)), (abs(y1 - y0) + 1, abs(x1 - x0) + 1)))
    return out


#: rows per chunk of the stored pixel mask: all-zero chunks are not stored at all
MASK_CHUNK_ROWS = 64
MASK_GZIP_LEVEL = 1


@dataclass(frozen=True)
class StoredMask:
    """A pixel mask and its gzip chunks, compressed once per config: writing a file copies bytes."""

    mask: np.ndarray
    chunk_rows: int
    chunks: tuple[tuple[int, bytes], ...]  # (first row, deflated bytes) of every non-zero chunk


def pixel_mask(config: DetectorConfig) -> np.ndarray:
    """The NXmx pixel mask of ``config``'s images (read-only, cached)."""
    return _stored_mask(config).mask


def _stored_mask(config: DetectorConfig) -> StoredMask:
    """Built once per config and process, like the assembler loads the calibration once at its start:
    the mask in a file is the one the data was converted with (restart to load a new pedestal file)."""
    return _build_mask(config.model_dump_json())


@lru_cache(maxsize=8)
def _build_mask(config_json: str) -> StoredMask:
    from daq_backend.detectors import layout_for
    from daq_backend.detectors.calibration import bad_pixels

    config = DetectorConfig.model_validate_json(config_json)
    layout = layout_for(config)
    mask = np.zeros(config.image_shape, dtype=np.uint32)
    mask.reshape(-1)[layout.uncovered_pixels] = MASK_GAP
    for m in config.required_modules:
        bad = bad_pixels(config, m)
        if bad is not None:
            index = layout.module_pixels(m)
            mask[index] = mask[index] | (bad.astype(np.uint32) * np.uint32(MASK_BAD))
    mask.flags.writeable = False
    rows = min(MASK_CHUNK_ROWS, mask.shape[0])
    chunks = []
    for first in range(0, mask.shape[0], rows):
        block = np.zeros((rows, mask.shape[1]), np.uint32)  # the last chunk is padded, as HDF5 stores it
        part = mask[first : first + rows]
        block[: part.shape[0]] = part
        if block.any():  # HDF5's deflate filter is zlib's format: zlib.compress writes what it reads
            chunks.append((first, zlib.compress(block.tobytes(), MASK_GZIP_LEVEL)))
    return StoredMask(mask, rows, tuple(chunks))


def _write_mask(detector: h5py.Group, stored: StoredMask) -> None:
    ds = detector.create_dataset("pixel_mask", shape=stored.mask.shape, dtype=np.uint32,
                                 chunks=(stored.chunk_rows, stored.mask.shape[1]), compression="gzip",
                                 compression_opts=MASK_GZIP_LEVEL, fillvalue=0)
    for first, data in stored.chunks:
        ds.id.write_direct_chunk((first, 0), data)


def _estimated_end(start_time: str, n_images: int, exptime: float | None, period: float | None) -> str:
    per_image = max(period or 0.0, exptime or 0.0)
    try:
        start = dt.datetime.fromisoformat(start_time)
    except ValueError:
        return start_time
    return (start + dt.timedelta(seconds=n_images * per_image)).isoformat(timespec="milliseconds")


def _metres(micrometres: float) -> float:
    """Micrometres in metres (a division: 320 um is exactly the float 0.00032, 320 * 1e-6 is not)."""
    return micrometres / 1e6


def _time_zone(start_time: str) -> str | None:
    """The UTC offset of the file's start time, ``+HH:MM`` (NXmx ``time_zone``)."""
    try:
        offset = dt.datetime.fromisoformat(start_time).utcoffset()
    except ValueError:
        return None
    if offset is None:
        return None
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _field(group: h5py.Group, name: str, value: Any, units: str | None = None, **attrs: Any) -> h5py.Dataset:
    ds = group.create_dataset(name, data=value)
    if units is not None:
        ds.attrs["units"] = units
    for key, val in attrs.items():
        ds.attrs[key] = val
    return ds


def _translation(group: h5py.Group, name: str, value: float, vector: tuple[float, float, float],
                 depends_on: str, units: str = "m") -> None:
    _field(group, name, np.float64(value), units, transformation_type="translation",
           vector=np.asarray(vector, dtype=np.float64), offset=np.zeros(3), depends_on=depends_on)


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.require_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def write_nexus(h5: h5py.File, config: DetectorConfig, *, n_images: int, metadata: dict[str, Any],
                start_time: str) -> None:
    """Add the NeXus/NXmx fields to a file whose ``/entry``, ``/entry/data`` and
    ``/entry/instrument/detector`` groups exist. ValueError when the request asks for NXmx but the
    detector config lacks what NXmx requires (pixel size, sensor)."""
    check_request_metadata(metadata)
    nxmx = nxmx_metadata(metadata)
    exptime = _seconds(metadata, "exptime", zero_ok=False)
    period = _seconds(metadata, "period", zero_ok=True)
    model = detector_model(config)
    if nxmx is not None:
        needed = (("pixel_size_um", model.pixel_size_um), ("sensor_material", model.sensor_material),
                  ("sensor_thickness_um", model.sensor_thickness_um))
        missing = [name for name, value in needed if value is None]
        if missing:
            raise ValueError(f"metadata.nxmx: NXmx needs {', '.join(missing)} in the detector config of "
                             f"{config.detector_name} (a {config.detector_type.value} does not say)")

    entry = h5[ENTRY]
    _field(entry, "start_time", start_time)
    _field(entry, "end_time_estimated", _estimated_end(start_time, n_images, exptime, period))
    data_group = h5[DATA_GROUP]
    data_group.attrs["axes"] = ["image_id", ".", "."]
    data_group.attrs["image_id_indices"] = np.int64(0)

    instrument = h5[INSTRUMENT]
    detector = h5[DETECTOR]
    detector["data"] = h5[DATA]  # a hard link: NXmx readers find the images under the detector
    if config.converted:
        h5[DATA].attrs["units"] = "keV"
    _field(detector, "description", model.description)
    if model.pixel_size_um is not None:
        _field(detector, "x_pixel_size", _metres(model.pixel_size_um), "m")
        _field(detector, "y_pixel_size", _metres(model.pixel_size_um), "m")
    if model.sensor_material is not None:
        _field(detector, "sensor_material", model.sensor_material)
    if model.sensor_thickness_um is not None:
        _field(detector, "sensor_thickness", _metres(model.sensor_thickness_um), "m")
    _field(detector, "bit_depth_readout", np.int32(model.bit_depth_readout))
    if model.saturation_value is not None:
        _field(detector, "saturation_value", np.int64(model.saturation_value))
    if exptime is not None:
        _field(detector, "count_time", exptime, "s")
    if period is not None and period > 0:
        _field(detector, "frame_time", period, "s")
    _write_mask(detector, _stored_mask(config))
    _field(detector, "pixel_mask_applied", np.bool_(config.converted and config.pedestal_file is not None))

    h, w = config.image_shape
    beam_x = nxmx.beam_center_x if nxmx is not None and nxmx.beam_center_x is not None else (w - 1) / 2
    beam_y = nxmx.beam_center_y if nxmx is not None and nxmx.beam_center_y is not None else (h - 1) / 2
    transformations = _group(detector, "transformations", "NXtransformations")
    depends_on = "."
    if nxmx is not None:
        _translation(transformations, "translation", nxmx.detector_distance, (0.0, 0.0, 1.0), ".")
        depends_on = DETECTOR_TRANSLATION
        _field(detector, "distance", nxmx.detector_distance, "m")
        _field(detector, "distance_derived", np.bool_(False))
        if nxmx.beam_center_x is not None:
            _field(detector, "beam_center_x", nxmx.beam_center_x, "pixel")
        if nxmx.beam_center_y is not None:
            _field(detector, "beam_center_y", nxmx.beam_center_y, "pixel")
    _field(detector, "depends_on", depends_on)
    if model.pixel_size_um is not None:
        pitch = _metres(model.pixel_size_um)
        for box in module_boxes(config):
            module = _group(detector, box.name, "NXdetector_module")
            _field(module, "data_origin", np.asarray(box.origin, dtype=np.int64))
            _field(module, "data_size", np.asarray(box.size, dtype=np.int64))
            # the module's first pixel relative to the beam centre, in the detector plane
            offset = np.array([-(box.origin[1] - beam_x) * pitch, -(box.origin[0] - beam_y) * pitch, 0.0])
            length = float(np.linalg.norm(offset))
            unit = offset / length if length else np.array([1.0, 0.0, 0.0])
            direction = (float(unit[0]), float(unit[1]), float(unit[2]))
            module_offset = f"{DETECTOR}/{box.name}/module_offset"
            _translation(module, "module_offset", length, direction, depends_on)
            _translation(module, "fast_pixel_direction", pitch, (-1.0, 0.0, 0.0), module_offset)
            _translation(module, "slow_pixel_direction", pitch, (0.0, -1.0, 0.0), module_offset)

    if nxmx is None:
        return
    _field(entry, "definition", "NXmx")
    if nxmx.title is not None:
        _field(entry, "title", nxmx.title)
    sample = _group(entry, "sample", "NXsample")
    _field(sample, "name", nxmx.sample_name)
    _field(sample, "depends_on", ".")
    source = _group(entry, "source", "NXsource")
    _field(source, "name", nxmx.source_name)
    _field(instrument, "name", nxmx.instrument_name)
    zone = _time_zone(start_time)
    if zone is not None:
        _field(instrument, "time_zone", zone)
    beam = _group(instrument, "beam", "NXbeam")
    _field(beam, "incident_wavelength", nxmx.incident_wavelength, "angstrom")
