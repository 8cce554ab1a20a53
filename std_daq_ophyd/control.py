"""The detector-control part of :class:`~std_daq_ophyd.detector.StdDaqDetector` (ophyd-async's
"trigger logic" + "acquire logic"): validate and send settings, start, stop, wait until idle.

Settings are checked here before anything is sent, so a bad value fails ``stage`` with a message
naming it; the backend validates again (per detector type) and its answer is passed on verbatim.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from std_daq_ophyd.client import StdDaqClient, StdDaqError

TIMING_MODES = ("AUTO_TIMING", "TRIGGER_EXPOSURE", "GATED", "BURST_TRIGGER")
BIT_DEPTHS = (0, 4, 8, 16, 32)  # 0 = keep the detector's


class SettingsError(ValueError):
    """A detector setting that cannot work; nothing was sent to the detector."""


@dataclass(frozen=True)
class Settings:
    """What one acquisition needs; ``bit_depth`` 0 keeps the detector's dynamic range."""

    exptime: float
    period: float
    frames: int
    triggers: int
    timing: str
    bit_depth: int = 0

    def validate(self) -> Settings:
        problems = []
        if not _real(self.exptime) or self.exptime <= 0:
            problems.append(f"exptime must be a positive number of seconds, got {self.exptime!r}")
        if not _real(self.period) or self.period < 0:
            problems.append(f"period must be >= 0 seconds, got {self.period!r}")
        elif _real(self.exptime) and 0 < self.period < self.exptime:
            problems.append(f"period {self.period!r} s is shorter than exptime {self.exptime!r} s")
        for name in ("frames", "triggers"):
            value = getattr(self, name)
            if not _integer(value) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        timing = _timing_name(self.timing)
        if timing not in TIMING_MODES:
            problems.append(f"timing {self.timing!r} is not a timing mode (one of {', '.join(TIMING_MODES)})")
        if self.bit_depth not in BIT_DEPTHS:
            problems.append(f"bit_depth must be one of {BIT_DEPTHS} (0 = keep), got {self.bit_depth!r}")
        if problems:
            raise SettingsError("; ".join(problems))
        return self

    def as_request(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "exptime": float(self.exptime),
            "period": float(self.period),
            "frames": int(self.frames),
            "triggers": int(self.triggers),
            "timing": _timing_name(self.timing),
        }
        if self.bit_depth:
            body["dr"] = int(self.bit_depth)
        return body


def _real(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _timing_name(value: Any) -> str:
    return str(value).removeprefix("timingMode.")


@dataclass(frozen=True)
class Geometry:
    """What one image looks like, from the DAQ's own configuration."""

    detector_name: str
    height: int
    width: int
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


class DetectorControl:
    """Drives one detector through the REST API of its DAQ."""

    def __init__(self, client: StdDaqClient, detector_name: str | None = None) -> None:
        self.client = client
        self._name = detector_name

    @property
    def detector_name(self) -> str:
        if self._name is None:
            self._name = self.client.health().detector_name
        return self._name

    def geometry(self) -> Geometry:
        """Image size and dtype as the DAQ writes them (``GET /config``)."""
        config = self.client.daq_config()
        return Geometry(config.detector_name, config.image_pixel_height, config.image_pixel_width,
                        np.dtype(config.image_dtype))

    def configure(self, settings: Settings) -> dict[str, Any]:
        """Validate, send, and return the detector's read-back (seed ``GET /detector`` shape)."""
        settings.validate()
        name = self.detector_name
        try:
            self.client.configure_detector(name, settings.as_request())
        except StdDaqError as exc:
            if exc.status_code == 409:  # still running from an earlier acquisition: stop it first
                self.stop()
                self.wait_idle(timeout=30.0)
                self.client.configure_detector(name, settings.as_request())
            else:
                raise
        readback = self.client.detector_settings(name).model_dump()
        readback["timing"] = _timing_name(readback.get("timing"))
        return readback

    def start(self) -> None:
        self.client.detector_command(self.detector_name, "START")

    def stop(self) -> None:
        """Stop an acquisition; stopping an idle detector is not an error here."""
        try:
            self.client.detector_command(self.detector_name, "STOP")
        except StdDaqError as exc:
            if exc.status_code != 409:
                raise

    def status(self) -> str:
        return self.client.detector_status(self.detector_name)

    def wait_idle(self, timeout: float, cancel: threading.Event | None = None, poll: float = 0.05) -> str:
        """Wait until the detector stopped running; returns its status (IDLE, ERROR, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status != "RUNNING":
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"detector {self.detector_name} still RUNNING after {timeout:g} s")
            if cancel is not None and cancel.wait(poll):
                return status
            if cancel is None:
                time.sleep(poll)
