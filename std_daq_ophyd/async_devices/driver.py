"""The DAQ's detector as an ophyd-async device: its configuration and settings as read-only signals,
refreshed from the REST API, and the detector calls the logics make (settings, START/STOP, STATUS).

The DAQ, not this device, owns the detector: every signal shows what the DAQ answered last
(``GET /config`` for the image geometry, ``GET /detector/<name>`` for the settings), so what the
run's configuration records is what the detector was really set to. ``connect()`` reads them once
(and fails with the DAQ's reason if it cannot); the trigger logic reads them again after it changed
the settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ophyd_async.core import Device, DeviceConnector, NotConnectedError, soft_signal_r_and_setter

from daq_backend.config import DetectorConfig
from daq_backend.rest.models import DetectorConfigResponse
from std_daq_ophyd.client import AsyncStdDaqClient, StdDaqError

#: states in which the detector is acquiring or waiting for triggers (slsDetector's names)
ACTIVE_STATES = frozenset({"RUNNING", "WAITING", "TRANSMITTING"})
TIMING_PREFIX = "timingMode."


def is_active(state: str) -> bool:
    """Whether a detector in ``state`` still acquires (or waits for triggers)."""
    return state.upper() in ACTIVE_STATES


class StdDaqConnector(DeviceConnector):
    """Connects the driver by asking the DAQ who it is: ``GET /health``, ``/config``, ``/detector/<name>``."""

    async def connect_real(self, device: Device, timeout: float, force_reconnect: bool) -> None:
        await super().connect_real(device, timeout, force_reconnect)
        if not isinstance(device, StdDaqDriverIO):
            raise TypeError(f"StdDaqConnector connects a StdDaqDriverIO, not {type(device).__name__}")
        try:
            await asyncio.wait_for(device.refresh(), timeout)
        except StdDaqError as exc:
            raise NotConnectedError(f"{device.client.url}: {exc}") from exc
        except TimeoutError as exc:
            raise NotConnectedError(f"{device.client.url} did not answer within {timeout:g} s") from exc


class StdDaqDriverIO(Device):
    """Signals of the detector behind one DAQ (``detector_name``: default the DAQ's own detector)."""

    def __init__(self, client: AsyncStdDaqClient, detector_name: str | None = None, name: str = "") -> None:
        self.client = client
        self._name_given = detector_name
        self.detector_name, self._set_detector_name = soft_signal_r_and_setter(str, detector_name or "")
        self.detector_type, self._set_detector_type = soft_signal_r_and_setter(str)
        self.bit_depth, self._set_bit_depth = soft_signal_r_and_setter(int)
        self.image_height, self._set_image_height = soft_signal_r_and_setter(int, units="pixel")
        self.image_width, self._set_image_width = soft_signal_r_and_setter(int, units="pixel")
        self.exposure_time, self._set_exposure_time = soft_signal_r_and_setter(float, units="s")
        self.acquire_period, self._set_acquire_period = soft_signal_r_and_setter(float, units="s")
        self.timing_mode, self._set_timing_mode = soft_signal_r_and_setter(str)
        self.frames_per_trigger, self._set_frames = soft_signal_r_and_setter(int)
        self.number_of_triggers, self._set_triggers = soft_signal_r_and_setter(int)
        self.detector_state, self._set_detector_state = soft_signal_r_and_setter(str)
        self.config: DetectorConfig | None = None
        super().__init__(name=name, connector=StdDaqConnector())

    @property
    def name_of_detector(self) -> str:
        """The detector's name at the DAQ (known once connected)."""
        if self._name_given:
            return self._name_given
        if self.config is None:
            raise RuntimeError(f"{self.name}: not connected to the DAQ yet (connect the detector first)")
        return self.config.detector_name

    async def refresh(self) -> None:
        """Read the DAQ's configuration and the detector's settings and state into the signals."""
        await self.refresh_config()
        await self.refresh_settings()
        await self.state()

    async def refresh_config(self) -> DetectorConfig:
        """``GET /config``: detector type, bit depth and image size as the DAQ writes them."""
        config = await self.client.daq_config()
        self.config = config
        self._set_detector_name(self._name_given or config.detector_name)
        self._set_detector_type(config.detector_type.value)
        self._set_bit_depth(config.bit_depth)
        self._set_image_height(config.image_pixel_height)
        self._set_image_width(config.image_pixel_width)
        return config

    async def refresh_settings(self) -> DetectorConfigResponse:
        """``GET /detector/<name>``: exposure, period, timing mode, frames and triggers."""
        settings = await self.client.detector_settings(self.name_of_detector)
        if settings.exptime is not None:
            self._set_exposure_time(float(settings.exptime))
        if settings.period is not None:
            self._set_acquire_period(float(settings.period))
        if settings.frames is not None:
            self._set_frames(int(settings.frames))
        if settings.triggers is not None:
            self._set_triggers(int(settings.triggers))
        if settings.timing is not None:
            self._set_timing_mode(str(settings.timing).removeprefix(TIMING_PREFIX))
        return settings

    async def configure(self, settings: Mapping[str, Any]) -> DetectorConfigResponse:
        """Send ``settings`` (validated as a whole by the DAQ) and read back what the detector took."""
        await self.client.configure_detector(self.name_of_detector, settings)
        return await self.refresh_settings()

    async def command(self, cmd: str) -> None:
        """``START`` or ``STOP``."""
        await self.client.detector_command(self.name_of_detector, cmd)

    async def state(self) -> str:
        """The detector's state (IDLE, RUNNING, WAITING, ERROR, ...), also kept in ``detector_state``."""
        state = (await self.client.detector_status(self.name_of_detector)).upper()
        self._set_detector_state(state)
        return state
