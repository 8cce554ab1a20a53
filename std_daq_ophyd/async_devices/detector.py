"""``StdDaqAsyncDetector``: a std-daq detector as an ophyd-async ``StandardDetector``.

Composed like ophyd-async's own detectors, from three logics over two devices that mirror the DAQ:

* :class:`~std_daq_ophyd.async_devices.driver.StdDaqDriverIO` (``driver``): the detector's settings
  and state as signals; :class:`~std_daq_ophyd.async_devices.writer_io.StdDaqWriterIO` (``writer``):
  the current write request (file, state, images written);
* :class:`~std_daq_ophyd.async_devices.trigger_logic.StdDaqTriggerLogic`: ``TriggerInfo`` -> timing
  mode, exposure, period, frames, triggers; dead time from the detector type;
* :class:`~std_daq_ophyd.async_devices.acquire_logic.StdDaqAcquireLogic`: arm / wait for idle /
  disarm;
* :class:`~std_daq_ophyd.async_devices.data_logic.StdDaqDataLogic`: one write request per
  ``prepare`` into the file the ``PathProvider`` names; StreamResource/StreamDatum for the images
  and their per-image status.

Everything goes through the DAQ's REST API (:class:`~std_daq_ophyd.client.AsyncStdDaqClient`), so
the DAQ may run on another host. ``StandardDetector`` decides when each logic acts; this class adds
one thing to its ``trigger`` and ``complete``: while they wait for images, the DAQ is watched, and a
wait that cannot end (the writer ended the file, the DAQ is unreachable, or the detector stopped
with images missing) fails at once with an error naming the step, instead of after the
``TriggerInfo.exposure_timeout`` without a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

from ophyd_async.core import (
    PathProvider,
    StandardDetector,
    StaticPathProvider,
    UUIDFilenameProvider,
    WatchableAsyncStatus,
    WatcherUpdate,
)

from std_daq_ophyd.async_devices.acquire_logic import StdDaqAcquireLogic
from std_daq_ophyd.async_devices.data_logic import StdDaqDataLogic
from std_daq_ophyd.async_devices.driver import StdDaqDriverIO, is_active
from std_daq_ophyd.async_devices.steps import COLLECT, AcquisitionStalled, AcquisitionStepError, AsyncTimeouts
from std_daq_ophyd.async_devices.trigger_logic import StdDaqTriggerLogic
from std_daq_ophyd.async_devices.writer_io import StdDaqWriterIO
from std_daq_ophyd.client import DEFAULT_URL, AsyncStdDaqClient, StdDaqError
from std_daq_ophyd.writer import default_output_dir

Updates = AsyncIterator[WatcherUpdate[int]]
#: how often the watch of a running acquisition looks at the detector's state
STATE_PERIOD = 0.25


def _unwrapped(method: Callable[..., Any]) -> Callable[..., Updates]:
    """The async generator behind a ``WatchableAsyncStatus.wrap``-ed method of ``StandardDetector``."""
    return cast(Callable[..., Updates], inspect.unwrap(method))


class StdDaqAsyncDetector(StandardDetector):
    """A std-daq detector. ``StdDaqAsyncDetector("http://daq-host:5000", name="det")`` is enough.

    ``path_provider``: where files go (default: a UUID name in ``STD_DAQ_DATA_DIR``, else in the DAQ's
    default data root ``~/.local/share/std-daq``; a folder inside the DAQ's output roots);
    ``detector_name``: the detector at the DAQ (default: the DAQ's own); ``token``: bearer token of
    the REST API (default: ``STD_DAQ_TOKEN`` / ``STD_DAQ_TOKEN_FILE``); ``compression``: ``none`` or
    ``bitshuffle-lz4``; ``timeouts``: the bounds of the acquisition's steps; ``nxmx``: the request's
    NXmx metadata (sample, source, beam; see the README's HDF5 layout): given, every file is an NXmx
    file, and a missing field fails ``prepare`` naming it.
    """

    def __init__(self, url: str = DEFAULT_URL, path_provider: PathProvider | None = None, *,
                 detector_name: str | None = None, token: str | None = None, compression: str = "none",
                 timeouts: AsyncTimeouts | None = None, nxmx: Mapping[str, Any] | None = None,
                 name: str = "") -> None:
        self.timeouts = timeouts or AsyncTimeouts()
        self.client = AsyncStdDaqClient(url, token=token)
        self.path_provider = path_provider or StaticPathProvider(UUIDFilenameProvider(), default_output_dir())
        self.driver = StdDaqDriverIO(self.client, detector_name)
        self.writer = StdDaqWriterIO(self.client, self.timeouts, compression)
        self._acquire = StdDaqAcquireLogic(self.driver, self.timeouts)
        self.add_detector_logics(
            StdDaqTriggerLogic(self.driver),
            self._acquire,
            StdDaqDataLogic(self.driver, self.writer, self.path_provider, nxmx),
        )
        self.add_config_signals(self.driver.detector_name, self.driver.bit_depth, self.driver.exposure_time,
                                self.driver.acquire_period, self.driver.timing_mode)
        super().__init__(name=name)

    # -- waits that fail as soon as they cannot end -----------------------------------------------
    @WatchableAsyncStatus.wrap
    async def trigger(self) -> Updates:
        async for update in self._unless_failed(_unwrapped(StandardDetector.trigger)(self)):
            yield update

    @WatchableAsyncStatus.wrap
    async def complete(self) -> Updates:
        async for update in self._unless_failed(_unwrapped(StandardDetector.complete)(self)):
            yield update

    async def _unless_failed(self, updates: Updates) -> Updates:
        """Pass ``updates`` on; if :meth:`_watch` finds the acquisition cannot finish, cancel the wait
        (like ``asyncio.timeout``) and raise what it found instead."""
        task = asyncio.current_task()
        assert task is not None
        watch = asyncio.create_task(self._watch(), name=f"{self.name}-watch")
        waiting = True

        def cancel_wait(done: asyncio.Task[None]) -> None:
            if waiting and not done.cancelled() and done.exception() is not None:
                task.cancel()

        watch.add_done_callback(cancel_wait)
        try:
            async for update in updates:
                yield update
            waiting = False
        except asyncio.CancelledError:
            failure = watch.exception() if watch.done() and not watch.cancelled() else None
            if failure is None:
                raise
            if hasattr(task, "uncancel"):
                task.uncancel()
            self.writer.failure_reported = True
            raise failure from None
        finally:
            waiting = False
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, AcquisitionStepError, StdDaqError):
                await watch

    async def _watch(self) -> None:
        """Return never; raise when the images being waited for cannot come: the write request failed,
        or the detector was started and is idle while no image arrived for ``timeouts.missing`` s."""
        writer, t = self.writer, self.timeouts
        failed = asyncio.create_task(writer.failed())
        try:
            seen, since = await writer.images_written.get_value(), time.monotonic()
            while True:
                done, _ = await asyncio.wait({failed}, timeout=STATE_PERIOD)
                if done:
                    raise failed.result()
                count = await writer.images_written.get_value()
                now = time.monotonic()
                if count != seen:
                    seen, since = count, now
                started = self._acquire.started
                if started is None or now - max(since, started) < t.missing:
                    continue
                try:
                    state = await self.driver.state()
                except StdDaqError:
                    continue  # the DAQ unreachable for long is the writer follower's to report
                if not is_active(state):
                    path = await writer.file_path.get_value()
                    raise AcquisitionStalled(
                        COLLECT, f"detector {self.driver.name_of_detector} is {state} and no image reached "
                                 f"{path} for {t.missing:g} s ({count} written): the missing images never "
                                 "arrived at the DAQ")
        finally:
            failed.cancel()
