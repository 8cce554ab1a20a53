"""A detector you can drive without hardware or C++ builds: the UDP simulator behind the
:class:`~daq_backend.control.base.DetectorControl` interface.

``start()`` sends ``frames * triggers`` images at ``1 / period`` Hz (``period = 0``: as fast as
possible) to ``dst_ip:start_udp_port + module``. Every timing mode is simulated with internal timing
(one trigger per period). Image ids continue across acquisitions, like a real detector's frame
counter, so the pipeline never sees an id twice. ``dr`` changes the bit depth of the packets sent
(Eiger 8/16/32); the pipeline's config must match it, exactly as with a real detector.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from daq_backend.config import DetectorConfig
from daq_backend.control.base import (
    CAPABILITIES,
    CONFIG_KEYS,
    DetectorCapabilities,
    DetectorCommandError,
    DetectorStateError,
    ParameterError,
    format_speed,
    format_timing,
    validate_settings,
)
from daq_backend.simulator.sender import DetectorSimulator

#: what the simulator can produce; Eiger's 4-bit mode has no pipeline config (bit_depth 8/16/32)
SIMULATED_CAPABILITIES: dict[str, DetectorCapabilities] = {
    "jungfrau": CAPABILITIES["jungfrau"],
    "eiger": dataclasses.replace(CAPABILITIES["eiger"], dynamic_ranges=frozenset({8, 16, 32})),
    "gigafrost": DetectorCapabilities(
        "gigafrost", frozenset({16}), frozenset({"AUTO_TIMING", "TRIGGER_EXPOSURE"}), tengiga_fixed=True,
    ),
}


class SimulatedDetectorControl:
    """:class:`~daq_backend.control.base.DetectorControl` backed by :class:`DetectorSimulator`."""

    def __init__(self, config: DetectorConfig, dst_ip: str = "127.0.0.1", start_udp_port: int | None = None,
                 first_image_id: int = 1, faults: dict[str, Any] | None = None) -> None:
        self.config = config
        self.name = config.detector_name
        self.detector_type = config.detector_type.value
        self._caps = SIMULATED_CAPABILITIES[self.detector_type]
        self._settings: dict[str, Any] = {
            "triggers": 1,
            "timing": "AUTO_TIMING",
            "frames": 1,
            "period": 0.01,
            "exptime": 0.001,
            "dr": config.bit_depth,
            "speed": "FULL_SPEED",
            "tengiga": True,
            "threshold": -1,
        }
        self._dst_ip = dst_ip
        self._start_udp_port = config.start_udp_port if start_udp_port is None else start_udp_port
        self._next_id = first_image_id
        #: fault injection for tests: keyword arguments of DetectorSimulator (drop_packets, drop_frames,
        #: duplicate, out_of_order, garbage_every), applied to every following acquisition
        self.faults: dict[str, Any] = dict(faults or {})
        self._sim: DetectorSimulator | None = None
        self._error: BaseException | None = None
        self._lock = threading.RLock()
        self._closed = False

    # -- state ---------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Account for a finished acquisition: advance the id counter, release the simulator."""
        sim = self._sim
        if sim is None or sim.running:
            return
        if sim.last_sent_id is not None:
            self._next_id = sim.last_sent_id + 1
        self._error = sim.error
        sim.close()
        self._sim = None

    @property
    def next_image_id(self) -> int:
        """Id of the first image of the next acquisition."""
        with self._lock:
            self._settle()
            return self._next_id

    @property
    def destination(self) -> tuple[str, int]:
        return self._dst_ip, self._start_udp_port

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running acquisition to finish; True when idle."""
        sim = self._sim
        return True if sim is None else sim.wait(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise DetectorStateError(f"{self.name}: detector control is closed")

    # -- DetectorControl -----------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        s = self._settings
        values = {
            "det_name": self.name,
            **{k: s[k] for k in CONFIG_KEYS if k != "det_name"},
            "timing": format_timing(s["timing"]),
            "speed": format_speed(s["speed"]),
        }
        return {k: values[k] for k in CONFIG_KEYS}

    def set_config(self, values: dict[str, Any]) -> dict[str, Any]:
        settings = validate_settings(values, self._caps)
        with self._lock:
            self._check_open()
            self._settle()
            if self._sim is not None:
                raise DetectorStateError(f"{self.name}: cannot change settings while the detector is running")
            self._settings.update(settings.given())
            return self.get_config()

    def start(self) -> None:
        with self._lock:
            self._check_open()
            self._settle()
            if self._sim is not None:
                raise DetectorStateError("detector is already running")
            s = self._settings
            config = self.config
            if s["dr"] != config.bit_depth:
                config = config.model_copy(update={"bit_depth": s["dr"]})
            try:
                sim = DetectorSimulator(
                    config,
                    rate_hz=1.0 / s["period"] if s["period"] > 0 else 0.0,
                    n_images=s["frames"] * s["triggers"],
                    start_id=self._next_id,
                    dst_host=self._dst_ip,
                    start_udp_port=self._start_udp_port,
                    **self.faults,
                )
            except (ValueError, OSError) as exc:
                raise DetectorCommandError(f"{self.name}: cannot start: {exc}") from exc
            self._error = None
            sim.start()
            self._sim = sim

    def stop(self) -> None:
        with self._lock:
            self._check_open()
            self._settle()
            if self._sim is None:
                raise DetectorStateError("detector is not running")
            self._sim.stop()
            self._settle()

    def status(self) -> str:
        with self._lock:
            self._settle()
            if self._sim is not None:
                return "RUNNING"
            return "ERROR" if self._error is not None else "IDLE"

    def configure_receiver(self, dst_ip: str, start_udp_port: int) -> None:
        last = start_udp_port + self.config.n_modules - 1
        if not 0 < start_udp_port or last > 65535:
            raise ParameterError(
                "start_udp_port", f"ports {start_udp_port}..{last} must lie in 1-65535"
            )
        with self._lock:
            self._check_open()
            self._settle()
            if self._sim is not None:
                raise DetectorStateError(f"{self.name}: cannot change the destination while running")
            self._dst_ip = dst_ip
            self._start_udp_port = start_udp_port

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._sim is not None:
                self._sim.stop()
            self._settle()
            self._closed = True
