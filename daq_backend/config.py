"""Detector configuration: the std-daq detector JSON (reference §1.5), validated once at the edge.

Accepts both the Era B names (``image_height``/``image_width``) and the later ones
(``image_pixel_height``/``image_pixel_width``). Every error names the offending field and why.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daq_backend.priority import DEFAULT_RT_PRIORITY
from daq_backend.validation import explain

_log = logging.getLogger(__name__)

JUNGFRAU_MODULE_SHAPE = (512, 1024)  # rows, columns of one Jungfrau module
#: rows, columns of one Jungfrau module with the inter-chip gap pixels inserted (2 per chip border)
JUNGFRAU_MODULE_SHAPE_WITH_GAPS = (514, 1030)
EIGER_HALF_MODULE_SHAPE = (256, 512)  # rows, columns of one Eiger UDP "module" (half module)
#: the Era B field names of the image size and the names they stand for (a new name given too wins)
ERA_B_NAMES = {"image_height": "image_pixel_height", "image_width": "image_pixel_width"}


class DetectorType(str, Enum):
    JUNGFRAU = "jungfrau"
    EIGER = "eiger"
    GIGAFROST = "gigafrost"


class ImageIdSource(str, Enum):
    """Where a Jungfrau image id comes from: SwissFEL's ``bunchid`` (pulse id) or the frame number.

    ``auto`` uses the bunch id when the detector sends a non-zero one, else the frame number
    (slsDetectorPackage's virtual Jungfrau sends ``bunchid = 0``)."""

    AUTO = "auto"
    PULSE_ID = "pulse_id"
    FRAME_INDEX = "frame_index"


class ConfigError(ValueError):
    """A detector configuration that cannot work; the message names the field."""


class DetectorConfig(BaseModel):
    """One detector as the whole pipeline sees it."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    detector_name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", min_length=1, max_length=64)
    detector_type: DetectorType
    n_modules: int = Field(ge=1, le=128)
    bit_depth: Literal[8, 16, 32]
    image_pixel_height: int = Field(ge=1, le=20000, validation_alias="image_pixel_height")
    image_pixel_width: int = Field(ge=1, le=20000)
    start_udp_port: int = Field(ge=1, le=65535)
    module_positions: dict[int, tuple[int, int, int, int]] = Field(default_factory=dict)
    image_id_source: ImageIdSource = ImageIdSource.AUTO
    udp_host: str = "127.0.0.1"
    frame_ring_slots: int = Field(default=1000, ge=4)
    image_ring_slots: int = Field(default=1000, ge=4)
    module_sync_queue_size: int = Field(default=50, ge=1)
    module_sync_timeout: float = Field(default=0.5, gt=0, description="seconds an incomplete id may wait")
    pedestal_gain_file: str | None = None
    gain_file: str | None = Field(
        default=None, min_length=1, description="jungfrau_utils gain file: /gains (4, H, W), ADU per keV")
    pedestal_file: str | None = Field(
        default=None, min_length=1, description="jungfrau_utils pedestal file: /gains (4, H, W), /pixel_mask")
    high_gain: bool = Field(default=False, description="Jungfrau runs in high-gain G0 (HG0) mode")
    gap_pixels: bool = Field(default=False, description="insert the 2-pixel gaps between Jungfrau chips")
    sensor_material: str | None = Field(default=None, min_length=1, description="NXmx sensor_material")
    sensor_thickness_um: float | None = Field(default=None, gt=0, le=100_000,
                                              description="NXmx sensor_thickness in micrometres")
    pixel_size_um: float | None = Field(default=None, gt=0, le=100_000,
                                        description="NXmx x/y_pixel_size in micrometres")
    writer_user_id: int = 0
    n_writers: int = Field(default=1, ge=1, le=32, description="h5 writer processes sharing the image "
                           "stream: writer k writes rows k, k+N, ... into its part file, a master file "
                           "of virtual datasets presents them in image order")
    receiver_rt_priority: int = Field(
        default=DEFAULT_RT_PRIORITY, ge=0, le=99,
        description="SCHED_FIFO priority of receiver processes, 0 = normal scheduling (see priority.py)")
    header_module_ids: dict[int, int] = Field(
        default_factory=dict,
        description="module -> the module id its UDP headers carry (slsDetector module_id, GigaFRoST "
                    "2*quadrant+link); a module not listed follows the id of the first stream on its port")

    readout_hosts: dict[str, list[int]] = Field(
        default_factory=dict,
        description="host name -> the modules it reads out (every module on exactly one host); each "
                    "host runs `std-daq up CONFIG --host NAME` and assembles only its modules into the "
                    "partial image of their bounding region; the first host writes the master file")
    readout_host: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.\-]+$",
        description="set by DetectorConfig.for_host: this config is that host's share of the detector "
                    "(its image is the host's region; host_regions and full_image_shape place it)")
    host_regions: dict[str, tuple[int, int, int, int]] = Field(
        default_factory=dict, description="set by for_host: each host's region (y, x, h, w) in the full "
                                          "image, in readout_hosts order (the first writes the master)")
    full_image_shape: tuple[int, int] | None = Field(
        default=None, description="set by for_host: (height, width) of the whole detector's image")

    @field_validator("header_module_ids", mode="before")
    @classmethod
    def _header_ids_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            try:
                return {int(k): v for k, v in value.items()}
            except ValueError:
                raise ValueError("header_module_ids: keys must be module numbers") from None
        return value

    @field_validator("udp_host")
    @classmethod
    def _resolvable(cls, host: str) -> str:
        """The receivers bind to it: a name that does not resolve would make them fail at start."""
        try:
            socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"udp_host: {host!r} does not resolve to an IPv4 address ({reason})") from None
        return host

    @model_validator(mode="before")
    @classmethod
    def _era_b_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for old, new in ERA_B_NAMES.items():
                if old in data and new not in data:
                    data[new] = data.pop(old)
            if data.get("detector_type") == "gf":
                data["detector_type"] = "gigafrost"
        return data

    @field_validator("module_positions", mode="before")
    @classmethod
    def _positions_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {int(k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _calibration(self) -> DetectorConfig:
        """Jungfrau conversion takes one of two layouts: today's single ``pedestal_gain_file`` or
        jungfrau_utils' ``gain_file`` + ``pedestal_file`` pair (see ``detectors/calibration.py``)."""
        jungfrau = self.detector_type is DetectorType.JUNGFRAU
        for name in ("pedestal_gain_file", "gain_file", "pedestal_file", "high_gain", "gap_pixels"):
            if getattr(self, name) not in (None, False) and not jungfrau:
                raise ValueError(f"{name}: only jungfrau images are converted/gap-corrected, this is "
                                 f"a {self.detector_type.value}")
        if (self.gain_file is None) != (self.pedestal_file is None):
            given, missing = ("gain_file", "pedestal_file") if self.pedestal_file is None else (
                "pedestal_file", "gain_file")
            raise ValueError(f"{missing}: required together with {given} (the jungfrau_utils layout "
                             "has a gain file and a pedestal file)")
        if self.pedestal_gain_file is not None and self.gain_file is not None:
            raise ValueError("pedestal_gain_file: give either pedestal_gain_file (single-file layout) or "
                             "gain_file + pedestal_file (jungfrau_utils layout), not both")
        if self.high_gain and self.gain_file is None:
            raise ValueError("high_gain: needs the jungfrau_utils layout (gain_file + pedestal_file carry "
                             "the HG0 plane; pedestal_gain_file has only G0, G1, G2)")
        return self

    @model_validator(mode="after")
    def _geometry(self) -> DetectorConfig:
        last_port = self.start_udp_port + self.n_modules - 1
        if last_port > 65535:
            raise ValueError(
                f"start_udp_port: {self.n_modules} modules from port {self.start_udp_port} need ports up to "
                f"{last_port}, above 65535; use a start_udp_port of at most {65536 - self.n_modules}"
            )
        for module, header_id in self.header_module_ids.items():
            if not 0 <= module < self.n_modules:
                raise ValueError(f"header_module_ids: module {module} is outside 0..{self.n_modules - 1}")
            if not 0 <= header_id <= 0xFFFF:
                raise ValueError(f"header_module_ids[{module}]: {header_id} is not a 16-bit module id")
        taken: dict[int, int] = {}
        for module, header_id in sorted(self.header_module_ids.items()):
            if header_id in taken:
                raise ValueError(f"header_module_ids: modules {taken[header_id]} and {module} both expect "
                                 f"header module id {header_id}")
            taken[header_id] = module
        h, w = self.image_pixel_height, self.image_pixel_width
        for module, (x0, y0, x1, y1) in self.module_positions.items():
            if not 0 <= module < self.n_modules:
                raise ValueError(f"module_positions: module {module} is outside 0..{self.n_modules - 1}")
            bounds = (("start_x", x0, w), ("end_x", x1, w), ("start_y", y0, h), ("end_y", y1, h))
            for name, v, limit in bounds:
                if not 0 <= v < limit:
                    raise ValueError(
                        f"module_positions[{module}]: {name}={v} lies outside the {h}x{w} image"
                    )
            dx, dy = abs(x1 - x0) + 1, abs(y1 - y0) + 1
            jf_rows, jf_cols = self.jungfrau_module_box
            expected = {
                DetectorType.JUNGFRAU: (jf_cols, jf_rows),
                DetectorType.EIGER: (514, 256),
            }.get(self.detector_type)
            if expected and (dx, dy) != expected:
                raise ValueError(
                    f"module_positions[{module}]: box is {dx}x{dy} px, a {self.detector_type.value} "
                    f"module needs {expected[0]}x{expected[1]} (width x height"
                    f"{', gap pixels inserted' if self.gap_pixels else ''})"
                )
        self._no_overlap()
        self._readout_hosts()
        if self.detector_type is DetectorType.JUNGFRAU and self.bit_depth != 16:
            raise ValueError(f"bit_depth: jungfrau sends 16-bit pixels, got {self.bit_depth}")
        if self.detector_type is DetectorType.GIGAFROST:
            if self.n_modules != 8:
                raise ValueError(f"n_modules: gigafrost streams over 8 links, got {self.n_modules}")
            if h % 4 or w % 24:
                raise ValueError(
                    "image_pixel_height/width: gigafrost needs height % 4 == 0 and width % 24 == 0, "
                    f"got {h}x{w}"
                )
        if self.detector_type is DetectorType.JUNGFRAU and not self.module_positions:
            rows, cols = self.jungfrau_module_box
            if (h, w) != (rows * self.n_modules, cols):
                raise ValueError(
                    "module_positions: required unless the image is the modules stacked vertically "
                    f"({rows * self.n_modules}x{cols}), got {h}x{w}"
                )
        if self.detector_type is DetectorType.EIGER and not self.module_positions:
            raise ValueError("module_positions: required for eiger (half-module boxes incl. flips)")
        return self

    def _no_overlap(self) -> None:
        """Two module boxes sharing a pixel would overwrite each other's pixels in every image."""
        boxes = sorted(
            (min(y0, y1), max(y0, y1), min(x0, x1), max(x0, x1), m)
            for m, (x0, y0, x1, y1) in self.module_positions.items()
        )
        for i, (top, bottom, left, right, m) in enumerate(boxes):
            for top2, bottom2, left2, right2, m2 in boxes[i + 1 :]:
                if top2 > bottom:
                    break  # sorted by top: no later box reaches up into this one
                if left2 <= right and left <= right2:
                    a, b = sorted((m, m2))
                    raise ValueError(
                        f"module_positions: modules {a} and {b} overlap (rows {max(top, top2)}.."
                        f"{min(bottom, bottom2)}, columns {max(left, left2)}..{min(right, right2)}); "
                        "each pixel of the image belongs to one module"
                    )

    def _readout_hosts(self) -> None:
        """Every module on exactly one host; each host's region (the bounding box of its modules)
        holds no other host's module, so the master file can place each host's partial image as one
        rectangle. A host's share (``readout_host``) must be the size of its region."""
        if self.readout_host is not None:
            region = self.host_regions.get(self.readout_host)
            if region is None or self.full_image_shape is None:
                raise ValueError(f"readout_host: {self.readout_host!r} needs host_regions naming it and "
                                 "full_image_shape (use DetectorConfig.for_host)")
            if tuple(region[2:]) != self.image_shape:
                raise ValueError(f"readout_host: region {region} of {self.readout_host!r} is not the "
                                 f"{self.image_shape[0]}x{self.image_shape[1]} image")
            return
        if not self.readout_hosts:
            return
        if self.detector_type is DetectorType.GIGAFROST:
            raise ValueError("readout_hosts: a gigafrost's 8 links each carry pixels spread over the "
                             "whole image; it cannot be split over hosts")
        if self.converted:
            raise ValueError("readout_hosts: pedestal/gain conversion tables cover the whole image; "
                             "a detector split over hosts is written unconverted")
        owner: dict[int, str] = {}
        for host, modules in self.readout_hosts.items():
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", host):
                raise ValueError(f"readout_hosts: host name {host!r} may hold only letters, digits, "
                                 "'_', '.', '-' (it names the host's part files)")
            if not modules:
                raise ValueError(f"readout_hosts[{host}]: no modules")
            for module in modules:
                if module not in self.required_modules:
                    raise ValueError(f"readout_hosts[{host}]: module {module} is not a module of this "
                                     f"detector ({', '.join(map(str, self.required_modules))})")
                if module in owner:
                    raise ValueError(f"readout_hosts: module {module} is on both {owner[module]} and {host}")
                owner[module] = host
        missing = [m for m in self.required_modules if m not in owner]
        if missing:
            raise ValueError(f"readout_hosts: module(s) {', '.join(map(str, missing))} on no host "
                             "(every module must be on exactly one)")
        boxes = self.module_boxes()
        regions = {h: self.host_region(h) for h in self.readout_hosts}
        for host, (y, x, h, w) in regions.items():
            for module, (top, left, bottom, right) in boxes.items():
                if owner[module] != host and top < y + h and bottom >= y and left < x + w and right >= x:
                    raise ValueError(
                        f"readout_hosts[{host}]: its modules' bounding region (rows {y}..{y + h - 1}, "
                        f"columns {x}..{x + w - 1}) contains module {module} of {owner[module]}; each "
                        "host's modules must form a rectangle of the image holding no other host's module")

    def module_boxes(self) -> dict[int, tuple[int, int, int, int]]:
        """Each required module's box ``(top, left, bottom, right)`` (inclusive) in the image."""
        if self.module_positions:
            return {m: (min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1))
                    for m, (x0, y0, x1, y1) in self.module_positions.items()}
        rows, cols = self.jungfrau_module_box  # a jungfrau without positions: modules stacked
        return {m: (m * rows, 0, m * rows + rows - 1, cols - 1) for m in range(self.n_modules)}

    def host_region(self, host: str) -> tuple[int, int, int, int]:
        """``(y, x, h, w)``: the bounding region of ``host``'s modules in the full image."""
        boxes = self.module_boxes()
        mine = [boxes[m] for m in self.readout_hosts[host]]
        top, left = min(b[0] for b in mine), min(b[1] for b in mine)
        bottom, right = max(b[2] for b in mine), max(b[3] for b in mine)
        return (top, left, bottom - top + 1, right - left + 1)

    def for_host(self, host: str) -> DetectorConfig:
        """This detector as ``host`` reads it out: only its modules, placed in its region's partial
        image (``image_pixel_height/width`` = the region's size, ``module_positions`` shifted into
        it), with ``readout_host``, every host's region and the full image shape kept for the writer
        agent. The config the processes of ``std-daq up CONFIG --host HOST`` run with."""
        if host not in self.readout_hosts:
            known = ", ".join(self.readout_hosts) or "none: the config has no readout_hosts"
            raise ConfigError(f"--host {host}: not one of the config's readout_hosts ({known})")
        y, x, h, w = self.host_region(host)
        positions: dict[str, list[int]] = {}
        for m in self.readout_hosts[host]:
            if self.module_positions:
                x0, y0, x1, y1 = self.module_positions[m]
            else:
                top, left, bottom, right = self.module_boxes()[m]
                x0, y0, x1, y1 = left, top, right, bottom
            positions[str(m)] = [x0 - x, y0 - y, x1 - x, y1 - y]
        data = self.to_json_dict()
        data.update(image_pixel_height=h, image_pixel_width=w, module_positions=positions,
                    readout_hosts={}, readout_host=host,
                    host_regions={name: list(self.host_region(name)) for name in self.readout_hosts},
                    full_image_shape=list(self.image_shape))
        return parse_config(data)

    # -- derived values -------------------------------------------------------------------
    @property
    def required_modules(self) -> tuple[int, ...]:
        """Modules the synchroniser waits for: the keys of ``module_positions`` (deactivated modules
        are simply left out), or every module when no positions are given."""
        if self.module_positions and self.detector_type is not DetectorType.GIGAFROST:
            return tuple(sorted(self.module_positions))
        return tuple(range(self.n_modules))

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_pixel_height, self.image_pixel_width)

    @property
    def jungfrau_module_box(self) -> tuple[int, int]:
        """(rows, columns) a Jungfrau module covers in the image: 512x1024, or 514x1030 with the
        inter-chip gap pixels inserted."""
        return JUNGFRAU_MODULE_SHAPE_WITH_GAPS if self.gap_pixels else JUNGFRAU_MODULE_SHAPE

    @property
    def converted(self) -> bool:
        """Jungfrau pedestal/gain conversion to float32 is on (either calibration layout)."""
        return self.detector_type is DetectorType.JUNGFRAU and (
            self.pedestal_gain_file is not None or self.gain_file is not None)

    @property
    def image_dtype(self) -> str:
        if self.converted:
            return "float32"
        return {8: "uint8", 16: "uint16", 32: "uint32"}[self.bit_depth]

    @property
    def image_nbytes(self) -> int:
        import numpy as np

        return self.image_pixel_height * self.image_pixel_width * np.dtype(self.image_dtype).itemsize

    def udp_port(self, module_id: int) -> int:
        return self.start_udp_port + module_id

    def header_module_id(self, module_id: int) -> int | None:
        """The module id the headers on this module's port must carry; None: learned from its stream."""
        return self.header_module_ids.get(module_id)

    def to_json_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["module_positions"] = {str(k): list(v) for k, v in self.module_positions.items()}
        data["header_module_ids"] = {str(k): v for k, v in self.header_module_ids.items()}
        for name in ("readout_hosts", "readout_host", "host_regions", "full_image_shape"):
            if not data.get(name):
                data.pop(name, None)  # a single-host config reads as it always did
        return data


def parse_config(data: dict[str, Any]) -> DetectorConfig:
    """Validate a detector config dict; raises ConfigError naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a JSON object, got {type(data).__name__}")
    try:
        config = DetectorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid detector config: {explain(exc, 'config')}") from None
    unknown = sorted(config.model_extra or {})
    if unknown:  # kept (seed files carry fields of other services), but a typo must not pass unseen
        _log.warning("detector config %s: ignoring unknown field(s) %s", config.detector_name,
                     ", ".join(unknown))
    return config


def load_config(path: str | Path) -> DetectorConfig:
    """Read and validate a detector JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read detector config {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse_config(data)
