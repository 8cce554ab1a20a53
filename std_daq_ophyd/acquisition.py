"""One acquisition followed until its images are on disk: progress for watchers, lost-image policy.

Used by ``trigger`` (step scans) and ``kickoff``/``complete`` (fly scans) alike. The images of an
acquisition are counted where it matters — rows flushed to the HDF5 file — and every image the
writer reports as not good (lost: zero-filled row; incomplete: missing packets or module id
mismatch) is counted against the acquisition and handled by the detector's policy:

* ``"fail"``: the Status fails with :class:`LostImagesError` (the scan stops, the file stays valid);
* ``"warn"``: a :class:`LostImagesWarning` is issued and the scan goes on;
* ``"ignore"``: only the count (``<name>_n_bad_images``) and the per-image status in the file remain.

Images that never reach the DAQ at all (whole frames lost on the network) fail the acquisition
whatever the policy: the file can then no longer be matched to the scan points.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ophyd.status import DeviceStatus

from std_daq_ophyd.control import DetectorControl
from std_daq_ophyd.writer import StdDaqWriter, WriterProgress

log = logging.getLogger(__name__)

POLICIES = ("fail", "warn", "ignore")


class LostImagesError(RuntimeError):
    """Images of an acquisition are missing or incomplete and the policy is ``"fail"``."""


class LostImagesWarning(UserWarning):
    """Images of an acquisition are missing or incomplete and the policy is ``"warn"``."""


class AcquisitionCancelled(RuntimeError):
    """The acquisition was stopped (``stop()``, pause, unstage) before its images were written."""


class ProgressStatus(DeviceStatus):
    """A Status whose watchers see images written: ``name, current, initial, target, unit="images",
    precision, fraction, time_elapsed, time_remaining`` (``fraction`` is the fraction *remaining*, the
    ophyd convention of ``MoveStatus`` and area-detector trigger statuses)."""

    def __init__(self, device: Any, target: int, **kwargs: Any) -> None:
        self.target = target
        self.current = 0
        self._start = time.monotonic()
        super().__init__(device, **kwargs)

    def watch(self, func: Callable[..., None]) -> None:
        self._watchers.append(func)
        func(**self._progress())

    def update(self, current: int) -> None:
        if current == self.current:
            return
        self.current = current
        for watcher in list(self._watchers):
            watcher(**self._progress())

    def _progress(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._start
        done = min(self.current, self.target)
        remaining = 1.0 - done / self.target if self.target else 0.0
        rate = done / elapsed if elapsed > 0 else 0.0
        return {
            "name": self.device.name, "current": done, "initial": 0, "target": self.target,
            "unit": "images", "precision": 0, "fraction": remaining, "time_elapsed": elapsed,
            "time_remaining": (self.target - done) / rate if rate > 0 else None,
        }

    def _settled(self) -> None:
        for watcher in list(self._watchers):
            watcher(**self._progress())


@dataclass(frozen=True)
class Timeouts:
    """``acquisition``: seconds on top of the acquisition's own duration; ``missing``: how long images may
    still trickle in after the detector went idle before they count as never arrived."""

    acquisition: float = 60.0
    missing: float = 10.0
    poll: float = 0.05


@dataclass(frozen=True)
class Outcome:
    progress: WriterProgress
    n_bad: int


def apply_policy(policy: str, n_bad: int, n_images: int, where: str) -> None:
    """Raise, warn or stay silent about ``n_bad`` not-good images of ``n_images``."""
    if n_bad <= 0 or policy == "ignore":
        return
    message = (f"{n_bad} of {n_images} images of {where} are missing or incomplete "
               "(see /entry/data/status in the file)")
    if policy == "fail":
        raise LostImagesError(message)
    warnings.warn(message, LostImagesWarning, stacklevel=2)
    log.warning(message)


class Acquisition:
    """Start (optionally) and follow one acquisition of ``n_images`` into the open file.

    ``run()`` blocks (call it in a thread); ``cancel()`` makes it stop early with
    :class:`AcquisitionCancelled`."""

    def __init__(self, control: DetectorControl, writer: StdDaqWriter, n_images: int, *, first_row: int,
                 bad_before: int, start: bool, expected_duration: float, timeouts: Timeouts,
                 status: ProgressStatus | None = None) -> None:
        self.control = control
        self.writer = writer
        self.n_images = n_images
        self.start = start
        self.expected_duration = expected_duration
        self.timeouts = timeouts
        self.status = status
        self._cancel = threading.Event()
        self.abandoned = False
        #: called with the rows written so far by this acquisition, at every look at the writer
        self.on_rows: Callable[[int], None] | None = None
        self.initial_rows = first_row
        self.initial_bad = bad_before
        self.target_rows = self.initial_rows + n_images

    def cancel(self, abandon: bool = False) -> None:
        """Stop following the acquisition. ``abandon``: its Status is to be left pending (a paused
        RunEngine re-runs the step; a Status failing meanwhile would fail the resumed plan)."""
        self.abandoned = abandon
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise AcquisitionCancelled(f"acquisition of {self.n_images} images stopped")

    def run(self) -> Outcome:
        t = self.timeouts
        if self.start:
            self.control.start()
        deadline = time.monotonic() + self.expected_duration + t.acquisition
        idle_since: float | None = None
        next_state_check = 0.0
        while True:
            self._check_cancel()
            progress = self.writer.poll()
            rows = progress.n_written - self.initial_rows
            if self.status is not None:
                self.status.update(rows)
            if self.on_rows is not None:
                self.on_rows(rows)
            if progress.n_written >= self.target_rows:
                break
            if progress.final:
                raise RuntimeError(f"the writer ended the file {progress.output_file} after "
                                   f"{progress.n_written} images: {progress.message}")
            now = time.monotonic()
            if now >= next_state_check:  # the detector's state costs a round trip: look 4x a second
                next_state_check = now + 0.25
                if idle_since is None and self.control.status() != "RUNNING":
                    idle_since = now
            if idle_since is not None and now - idle_since > t.missing:
                missing = self.target_rows - progress.n_written
                raise LostImagesError(
                    f"{missing} of {self.n_images} images never reached the writer ({t.missing:g} s after "
                    f"the detector stopped); lost on the network before the DAQ could see them")
            if now > deadline:
                raise TimeoutError(
                    f"only {progress.n_written - self.initial_rows} of {self.n_images} images written after "
                    f"{self.expected_duration + t.acquisition:g} s")
            self._cancel.wait(t.poll)
        self.control.wait_idle(timeout=t.acquisition, cancel=self._cancel)
        self._check_cancel()
        progress = self.writer.poll()
        if progress.n_written > self.target_rows:
            raise RuntimeError(
                f"the file {progress.output_file} received {progress.n_written - self.target_rows} images "
                "more than this acquisition took: is someone else acquiring with this DAQ?")
        return Outcome(progress, progress.n_bad - self.initial_bad)
