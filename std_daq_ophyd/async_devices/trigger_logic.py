"""How ``TriggerInfo`` becomes detector settings: timing mode, exposure, period, frames, triggers.

ophyd-async's three trigger types are slsDetector timing modes:

=================================  =====================  =======================================
``TriggerInfo.trigger``            timing mode            ``num`` exposures are
=================================  =====================  =======================================
``DetectorTrigger.INTERNAL``       ``AUTO_TIMING``        ``frames=num``, ``triggers=1``
``DetectorTrigger.EXTERNAL_EDGE``  ``TRIGGER_EXPOSURE``   ``frames=1``, ``triggers=num``
``DetectorTrigger.EXTERNAL_LEVEL`` ``GATED`` (Eiger)      ``frames=num`` gates, ``triggers=1``
=================================  =====================  =======================================

(``BURST_TRIGGER`` has no ``TriggerInfo`` counterpart.) The DAQ validates the settings per detector
type, so an unsupported combination (``GATED`` on a Jungfrau) is refused at ``prepare`` with its
reason. ``livetime`` 0 keeps the detector's exposure time; ``deadtime`` 0 uses the detector type's
dead time (:data:`DEADTIME_S`), so the internal period is ``livetime + deadtime``.
"""

from __future__ import annotations

from ophyd_async.core import DetectorTrigger, DetectorTriggerLogic, SignalDict, SignalR, TriggerInfo

from std_daq_ophyd.async_devices.driver import StdDaqDriverIO
from std_daq_ophyd.async_devices.steps import CONFIGURE, AcquisitionStepError, in_step

#: Minimum time between two exposures per detector type, a safe upper limit (seconds):
#: Jungfrau 20 us (the figure of ophyd-async's Jungfrau detector); Eiger 40 us (the readout time the
#: LImA slsDetector Eiger plugin assumes for PSI's Eiger); GigaFRoST 800 us (one full frame at its
#: documented top rate of 1.25 kHz: no shorter dead time is documented).
DEADTIME_S: dict[str, float] = {"jungfrau": 20e-6, "eiger": 40e-6, "gigafrost": 800e-6}

TIMING_OF_TRIGGER: dict[DetectorTrigger, str] = {
    DetectorTrigger.INTERNAL: "AUTO_TIMING",
    DetectorTrigger.EXTERNAL_EDGE: "TRIGGER_EXPOSURE",
    DetectorTrigger.EXTERNAL_LEVEL: "GATED",
}
TRIGGER_OF_TIMING: dict[str, DetectorTrigger] = {v: k for k, v in TIMING_OF_TRIGGER.items()}


def deadtime_of(detector_type: str) -> float:
    """The dead time of ``detector_type`` (``jungfrau``, ``eiger``, ``gigafrost``)."""
    try:
        return DEADTIME_S[detector_type]
    except KeyError:
        known = ", ".join(sorted(DEADTIME_S))
        raise ValueError(f"no dead time known for detector type {detector_type!r} (known: {known})") from None


def _number(num: int) -> int:
    if num < 1:
        raise ValueError(f"the detector needs a number of exposures >= 1, got {num} "
                         "(TriggerInfo.number_of_events=0, 'infinite', is not supported)")
    return num


class StdDaqTriggerLogic(DetectorTriggerLogic):
    """Sets timing mode, exposure, period, frames and triggers through the DAQ's REST API."""

    def __init__(self, driver: StdDaqDriverIO) -> None:
        self.driver = driver

    def config_sigs(self) -> set[SignalR]:
        return {self.driver.detector_type}

    def get_deadtime(self, config_values: SignalDict) -> float:
        return deadtime_of(str(config_values[self.driver.detector_type]))

    async def _livetime(self, livetime: float) -> float:
        if livetime:
            return livetime
        async with in_step(CONFIGURE):
            settings = await self.driver.refresh_settings()
        if settings.exptime is None:
            raise AcquisitionStepError(
                CONFIGURE, "TriggerInfo.livetime=0 keeps the detector's exposure time, but the detector "
                           "reports none: give a livetime")
        return float(settings.exptime)

    async def _configure(self, **settings: object) -> None:
        async with in_step(CONFIGURE):
            await self.driver.configure(settings)

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        exptime = await self._livetime(livetime)
        deadtime = deadtime or deadtime_of(await self.driver.detector_type.get_value())
        await self._configure(timing=TIMING_OF_TRIGGER[DetectorTrigger.INTERNAL], frames=_number(num),
                              triggers=1, exptime=exptime, period=exptime + deadtime)

    async def prepare_edge(self, num: int, livetime: float) -> None:
        exptime = await self._livetime(livetime)
        await self._configure(timing=TIMING_OF_TRIGGER[DetectorTrigger.EXTERNAL_EDGE], frames=1,
                              triggers=_number(num), exptime=exptime)

    async def prepare_level(self, num: int) -> None:
        await self._configure(timing=TIMING_OF_TRIGGER[DetectorTrigger.EXTERNAL_LEVEL], frames=_number(num),
                              triggers=1)

    async def default_trigger_info(self) -> TriggerInfo:
        """The detector's current settings as a ``TriggerInfo`` (one event of all its images)."""
        async with in_step(CONFIGURE):
            await self.driver.refresh_settings()
        timing = await self.driver.timing_mode.get_value()
        if timing not in TRIGGER_OF_TIMING:
            raise ValueError(f"the detector's timing mode {timing!r} has no TriggerInfo counterpart "
                             f"(one of {', '.join(TRIGGER_OF_TIMING)})")
        exptime = await self.driver.exposure_time.get_value()
        period = await self.driver.acquire_period.get_value()
        frames = await self.driver.frames_per_trigger.get_value()
        triggers = await self.driver.number_of_triggers.get_value()
        trigger = TRIGGER_OF_TIMING[timing]
        return TriggerInfo(
            trigger=trigger,
            livetime=exptime if trigger is not DetectorTrigger.EXTERNAL_LEVEL else 0.0,
            deadtime=max(period - exptime, 0.0) if trigger is DetectorTrigger.INTERNAL else 0.0,
            collections_per_event=max(frames * triggers, 1),
        )
