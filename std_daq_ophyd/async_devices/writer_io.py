"""One write request of the DAQ followed as signals: the file, its state, the images written.

:class:`StdDaqWriterIO` opens one open-ended request (``POST /write_async``: "the next images into
this file, until told to finish"), waits until the writer follows the image stream, then looks at
``GET /requests/<id>`` every ``poll`` seconds in a background task and publishes what it sees:
``images_written`` (rows complete and flushed in the file: what StreamDatum documents may
reference), ``bad_images`` (rows written lost or incomplete), ``request_state`` and ``file_path``.
``close()`` finishes the request (the file is marked *completed* with what it holds).

If the request ends while it is followed (the writer failed, someone killed it) or the DAQ stays
unreachable longer than its bound, the follower records the failure in :attr:`failure`, so that a
detector waiting for images can fail at once with that reason instead of waiting out its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import PurePath
from typing import Any

from ophyd_async.core import Device, soft_signal_r_and_setter

from daq_backend.messages import FINAL_STATES, OPEN_ENDED, RequestState
from daq_backend.rest.models import RequestStatus
from daq_backend.writer.layout import COMPRESSIONS
from daq_backend.writer.request import WriteRequest
from std_daq_ophyd.async_devices.steps import (
    CLOSE_FILE,
    COLLECT,
    OPEN_FILE,
    AcquisitionStalled,
    AcquisitionStepError,
    AsyncTimeouts,
    in_step,
    poll_until,
)
from std_daq_ophyd.client import AsyncStdDaqClient, StdDaqError

#: the action the writer reports once it created the file and follows the images
FOLLOWING = "request_progress"


def following(status: RequestStatus) -> bool:
    """The writer created the file and writes the images as they come (or the request ended)."""
    return status.state in FINAL_STATES or FOLLOWING in status.services.values()


def show(status: RequestStatus) -> str:
    """A request's state in a few words, for error messages."""
    services = ", ".join(f"{k}: {v}" for k, v in status.services.items()) or "no service reported yet"
    return f"{status.state.value}, {status.n_written} images written, {services}"


class StdDaqWriterIO(Device):
    """The write request of the current acquisition, as signals."""

    def __init__(self, client: AsyncStdDaqClient, timeouts: AsyncTimeouts, compression: str = "none",
                 name: str = "") -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        self.client = client
        self.timeouts = timeouts
        self.compression = compression
        self.file_path, self._set_file_path = soft_signal_r_and_setter(str)
        self.request_id, self._set_request_id = soft_signal_r_and_setter(str)
        self.request_state, self._set_request_state = soft_signal_r_and_setter(str)
        self.images_written, self._set_images_written = soft_signal_r_and_setter(int)
        self.bad_images, self._set_bad_images = soft_signal_r_and_setter(int)
        self.last: RequestStatus | None = None
        #: why following the request failed (None: it did not); see :meth:`failed`
        self.failure: AcquisitionStepError | None = None
        #: set by whoever raised :attr:`failure` to the user, so that ``close`` does not raise it twice
        self.failure_reported = False
        self._failed: asyncio.Event | None = None  # made in the running loop, on first use
        self._counts: tuple[int, int] | None = None
        self._id: str | None = None
        self._follower: asyncio.Task[None] | None = None
        super().__init__(name=name)

    @property
    def is_open(self) -> bool:
        return self._id is not None

    async def failed(self) -> AcquisitionStepError:
        """Wait until following the request failed; returns why."""
        await self._failed_event().wait()
        assert self.failure is not None
        return self.failure

    def _failed_event(self) -> asyncio.Event:
        if self._failed is None:
            self._failed = asyncio.Event()
        return self._failed

    def _publish(self, status: RequestStatus) -> None:
        self.last = status
        self._set_request_state(status.state.value)
        counts = (status.n_written, status.n_missing_images + status.n_incomplete_images)
        # only changes are published: a stalled count must look stalled to whoever waits on it
        if counts != self._counts:
            self._counts = counts
            self._set_images_written(counts[0])
            self._set_bad_images(counts[1])

    async def open(self, path: PurePath, metadata: dict[str, Any] | None = None) -> RequestStatus:
        """Start writing into ``path`` and return once the writer follows the image stream."""
        if self.is_open:
            raise AcquisitionStepError(OPEN_FILE, f"{self.name}: {await self.file_path.get_value()} "
                                                  "is still open (close it first)")
        # the fields are checked here; the folder is the DAQ host's to check (it may be another host)
        request = WriteRequest.model_validate(
            {"output_file": str(path), "n_images": OPEN_ENDED, "compression": self.compression,
             "metadata": metadata or {}}, context={"check_filesystem": False})
        self.failure, self.failure_reported, self.last, self._counts = None, False, None, None
        self._failed_event().clear()
        async with in_step(OPEN_FILE):
            request_id = await self.client.write_async(request)
        self._id = request_id
        self._set_request_id(request_id)
        self._set_file_path(str(path))
        t = self.timeouts
        try:
            async with in_step(OPEN_FILE):
                status = await poll_until(
                    lambda: self.client.request_status(request_id), following, step=OPEN_FILE,
                    bound=t.open_file, poll=t.poll, show=show,
                    waiting_for=f"the writer to follow the images into {path} (busy with another request?)")
        except BaseException:
            await self._withdraw(request_id)
            raise
        self._publish(status)
        if status.state in FINAL_STATES:
            self._id = None
            raise AcquisitionStepError(OPEN_FILE, f"the writer could not start {path}: {status.message}")
        self._follower = asyncio.create_task(self._follow(request_id), name=f"{self.name}-follow")
        return status

    async def _withdraw(self, request_id: str) -> None:
        """Kill a request that did not start in time: it must not start writing later, unwatched."""
        self._id = None
        with contextlib.suppress(StdDaqError):
            await self.client.stop_request(request_id, wait=False)

    def _fail(self, failure: AcquisitionStepError) -> None:
        if self.failure is None:
            self.failure = failure
            self._failed_event().set()

    async def _follow(self, request_id: str) -> None:
        """Publish the request's progress until it ends or the follower is cancelled."""
        t = self.timeouts
        unreachable_since: float | None = None
        while True:
            try:
                status = await self.client.request_status(request_id)
            except StdDaqError as exc:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > t.unreachable:
                    self._fail(AcquisitionStalled(
                        COLLECT, f"the DAQ did not answer about request {request_id} for "
                                 f"{t.unreachable:g} s: {exc}"))
                    return
            else:
                unreachable_since = None
                self._publish(status)
                if status.state in FINAL_STATES:
                    self._fail(AcquisitionStepError(
                        COLLECT, f"the writer ended {status.output_file} ({status.state.value}) after "
                                 f"{status.n_written} images: {status.message}"))
                    return
            await asyncio.sleep(t.poll)

    async def close(self) -> RequestStatus | None:
        """Finish the request: the file keeps what was written and is marked *completed*. Returns the
        final status (None if no file was open). A failure of the writer not yet reported is raised."""
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        request_id, self._id = self._id, None
        reported = self.failure_reported
        # the failure belonged to this request: a wait of the next one must not see it
        self.failure, self.failure_reported = None, False
        self._failed_event().clear()
        if request_id is None:
            return None
        t = self.timeouts
        async with in_step(CLOSE_FILE):
            status = await self.client.stop_request(request_id, finish=True)
            if status.state not in FINAL_STATES:  # answered 202: not ended within the DAQ's kill timeout
                status = await poll_until(
                    lambda: self.client.request_status(request_id), lambda s: s.state in FINAL_STATES,
                    step=CLOSE_FILE, bound=t.close_file, poll=t.poll, show=show,
                    waiting_for=f"the writer to close {status.output_file}")
        self._publish(status)
        if status.state is RequestState.FAILED and not reported:
            raise AcquisitionStepError(CLOSE_FILE,
                                       f"the writer failed {status.output_file}: {status.message}")
        return status
