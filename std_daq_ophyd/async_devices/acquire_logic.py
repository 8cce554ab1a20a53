"""Arm, wait for idle and disarm the detector through the DAQ's REST API, each wait bounded.

* ``start_acquiring`` (*arm*): ``START``, unless the detector already acquires the prepared
  exposures (a second ``kickoff`` of the same ``prepare``);
* ``wait_for_idle``: once every image is written the detector must report idle within
  ``AsyncTimeouts.idle``; a detector that reports ``ERROR`` fails the step;
* ``ensure_stopped`` (*disarm*, also on ``stage``): ``STOP`` (an idle detector is fine) and wait
  until it is idle within ``AsyncTimeouts.disarm``.

``started`` is the time of the last START, so that whoever waits for images knows since when the
detector could have sent them.
"""

from __future__ import annotations

import time

from ophyd_async.core import DetectorAcquireLogic

from std_daq_ophyd.async_devices.driver import StdDaqDriverIO, is_active
from std_daq_ophyd.async_devices.steps import (
    ARM,
    DISARM,
    WAIT_FOR_IDLE,
    AcquisitionStepError,
    AsyncTimeouts,
    in_step,
    poll_until,
)
from std_daq_ophyd.client import StdDaqError

CONFLICT = 409  # the DAQ's answer to STOP on an idle detector (and START on a running one)


class StdDaqAcquireLogic(DetectorAcquireLogic):
    """Starts and stops the detector behind the DAQ."""

    def __init__(self, driver: StdDaqDriverIO, timeouts: AsyncTimeouts) -> None:
        self.driver = driver
        self.timeouts = timeouts
        #: ``time.monotonic()`` of the last START (None: not started since the last disarm)
        self.started: float | None = None

    async def start_acquiring(self) -> None:
        async with in_step(ARM):
            if is_active(await self.driver.state()):
                return  # already acquiring what prepare set up (kickoff after kickoff)
            await self.driver.command("START")
        self.started = time.monotonic()

    async def wait_for_idle(self) -> None:
        t = self.timeouts
        async with in_step(WAIT_FOR_IDLE):
            state = await poll_until(self.driver.state, lambda s: not is_active(s), step=WAIT_FOR_IDLE,
                                     bound=t.idle, poll=t.poll,
                                     waiting_for=f"detector {self.driver.name_of_detector} to go idle "
                                                 "after its last image was written")
        if state == "ERROR":
            raise AcquisitionStepError(
                WAIT_FOR_IDLE, f"detector {self.driver.name_of_detector} reports ERROR after the acquisition")

    async def ensure_stopped(self) -> None:
        t = self.timeouts
        self.started = None
        async with in_step(DISARM):
            try:
                await self.driver.command("STOP")
            except StdDaqError as exc:
                if exc.status_code != CONFLICT:
                    raise
            await poll_until(self.driver.state, lambda s: not is_active(s), step=DISARM, bound=t.disarm,
                             poll=t.poll, waiting_for=f"detector {self.driver.name_of_detector} to stop")
