"""The steps of one acquisition, their time bounds, and the errors that name the step that failed.

An acquisition through the DAQ's REST API goes *open file* (a write request the writer follows),
*configure* (timing mode, exposure, frames), *arm* (START), *collect* (images reach the file),
*wait for idle* (the detector finished), *disarm* (STOP) and *close file* (the request finished).
Every wait in these steps is bounded by :class:`AsyncTimeouts`; when a bound passes, the error is an
:class:`AcquisitionStalled` that says which step stalled, what it waited for and what it saw last.
When the DAQ refuses a step, the error is an :class:`AcquisitionStepError` with the DAQ's reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from std_daq_ophyd.client import StdDaqError

T = TypeVar("T")

OPEN_FILE = "open file"
CONFIGURE = "configure"
ARM = "arm"
COLLECT = "collect"
WAIT_FOR_IDLE = "wait for idle"
DISARM = "disarm"
CLOSE_FILE = "close file"


class AcquisitionStepError(RuntimeError):
    """A step of the acquisition failed; ``step`` names it (``"arm"``, ``"close file"``, ...)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


class AcquisitionStalled(AcquisitionStepError, TimeoutError):
    """A step of the acquisition did not finish within its bound."""


@dataclass(frozen=True)
class AsyncTimeouts:
    """Bounds of the steps, in seconds.

    ``open_file``: until the writer follows the image stream; ``configure``/``arm``/``disarm``: until
    the detector took the settings, started, stopped; ``idle``: until the detector reports idle once
    all images are written; ``missing``: how long an armed detector that went idle may leave the
    file short of images before they count as never arrived; ``unreachable``: how long the DAQ may
    stay unreachable while images are collected; ``close_file``: until the write request ended;
    ``poll``: the period of every look at the DAQ.
    """

    open_file: float = 60.0
    configure: float = 30.0
    arm: float = 30.0
    idle: float = 60.0
    missing: float = 10.0
    unreachable: float = 30.0
    disarm: float = 30.0
    close_file: float = 60.0
    poll: float = 0.05


async def poll_until(look: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, step: str, bound: float,
                     poll: float, waiting_for: str, show: Callable[[T], str] = str) -> T:
    """Look (``await look()``) every ``poll`` s until ``done(value)``; returns that value. After
    ``bound`` s raises :class:`AcquisitionStalled` naming ``step``, what it was ``waiting_for`` and the
    last value seen (``show(value)``)."""
    deadline = time.monotonic() + bound
    while True:
        value = await look()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise AcquisitionStalled(step, f"still waiting for {waiting_for} after {bound:g} s "
                                           f"(last seen: {show(value)})")
        await asyncio.sleep(poll)


@asynccontextmanager
async def in_step(step: str) -> AsyncIterator[None]:
    """Errors of the DAQ inside the block become :class:`AcquisitionStepError` naming ``step``."""
    try:
        yield
    except AcquisitionStepError:
        raise
    except StdDaqError as exc:
        raise AcquisitionStepError(step, str(exc)) from exc
