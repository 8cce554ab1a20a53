"""Request tracking: what the REST API knows about each write request, from the broker's statuses.

:class:`RequestTracker` turns the status messages of the services on a broker tag (writer agent,
EPICS writer) into one :class:`RequestRecord` per request: its :class:`RequestState`, progress
(``n_written``, the lost-image counts), output file, messages and timestamps. Every client sees the
same record, and a waiter (:meth:`RequestTracker.wait`, :meth:`RequestTracker.wait_async`) waits
exactly as long as the request runs: it ends on the request's final status, or after an idle timeout
without any status. :func:`refuse_if_busy` is the one-write-at-a-time rule; :func:`acquisition_log`
describes a record as the admin interface's ``acquisition`` object. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from daq_backend.broker import FINAL_ACTIONS, Action, StatusMessage
from daq_backend.messages import FINAL_STATES, RequestState
from daq_backend.rest.errors import Busy
from daq_backend.rest.models import RequestKind

#: what a request writes: detector images (the writer agent) or EPICS channels (the EPICS writer)
DETECTOR: RequestKind = "detector"
EPICS: RequestKind = "epics"


class IdleTimeout(Exception):
    """No status for a request within the caller's timeout (plus grace); it may still be running."""

    def __init__(self, record: RequestRecord, idle_for: float) -> None:
        super().__init__(f"no status for request {record.request_id} in {idle_for:g} s")
        self.record = record


# -- request tracking ----------------------------------------------------------------------------


def _as_dict(message: Any) -> dict[str, Any] | None:
    if isinstance(message, dict):
        return message
    if isinstance(message, str | bytes) and message[:1] in ("{", b"{"):
        try:
            data = json.loads(message)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass
class RequestRecord:
    """What is known about one request; copies are handed out, the tracker owns the original."""

    request_id: str
    request: dict[str, Any] | None
    created: float
    kind: RequestKind = DETECTOR
    state: RequestState = RequestState.QUEUED
    n_written: int = 0
    n_missing_images: int = 0
    n_incomplete_images: int = 0
    n_images: int | None = None
    output_file: str | None = None
    message: str | None = None
    #: a warning of the service (e.g. less free space than the images need)
    warning: str | None = None
    init_timestamp: float | None = None
    end_timestamp: float | None = None
    run_id: int | str | None = None
    result: Any = None
    services: dict[str, str] = field(default_factory=dict)
    #: services that must all end the request before it is final (a detector over several readout
    #: hosts: each host's writer agent, the master file's first); empty: whichever services answered
    expected_services: tuple[str, ...] = ()
    failures: dict[str, str] = field(default_factory=dict)
    kill_requested: bool = False
    finish_requested: bool = False
    last_activity: float = field(default_factory=time.monotonic)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def final_action(self) -> str | None:
        """The ``status`` of a ``write_sync`` answer: the broker action that ended the request."""
        if not self.final:
            return None
        return (
            Action.FAIL.value if self.failures or self.state is RequestState.FAILED else Action.SUCCESS.value
        )

    def copy(self) -> RequestRecord:
        return dataclasses.replace(self, services=dict(self.services), failures=dict(self.failures))

    def absorb_request(self, request: dict[str, Any] | None) -> None:
        if request is None or self.request is not None:
            return
        self.request = request
        self.n_images = _int(request.get("n_images"))
        output_file = request.get("output_file")
        self.output_file = output_file if isinstance(output_file, str) else None


class RequestTracker:
    """Turns status messages into :class:`RequestRecord` states; thread-safe, bounded (LRU).

    ``on_kill_again(request_id)`` is called when a request that was killed while still queued starts
    after all (a service ignores kills of requests it has not started), so a stop is never lost.
    """

    def __init__(
        self,
        max_records: int = 1000,
        max_logs: int = 1000,
        on_kill_again: Callable[[str, str], None] | None = None,
    ) -> None:
        self.max_records = max_records
        self._records: collections.OrderedDict[str, RequestRecord] = collections.OrderedDict()
        self._logs: collections.deque[RequestRecord] = collections.deque(maxlen=max_logs)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watchers: set[Callable[[], None]] = set()
        self._last_activity = time.monotonic()
        self._on_kill_again = on_kill_again

    # -- records ------------------------------------------------------------------------------
    def register(
        self,
        request_id: str,
        request: dict[str, Any],
        *,
        run_id: int | str | None = None,
        kind: RequestKind = DETECTOR,
        expected_services: Sequence[str] = (),
    ) -> RequestRecord:
        """Record a request before it is published (its first status may arrive at once).
        ``expected_services``: see :attr:`RequestRecord.expected_services`."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None:
                record = self._insert(RequestRecord(request_id, None, time.time(), kind))
            record.absorb_request(request)
            record.run_id = run_id
            record.expected_services = tuple(expected_services)
            record.last_activity = time.monotonic()
            return record.copy()

    def forget(self, request_id: str) -> None:
        """Drop a request that could not be published."""
        with self._lock:
            self._records.pop(request_id, None)

    def _insert(self, record: RequestRecord) -> RequestRecord:
        self._records[record.request_id] = record
        while len(self._records) > self.max_records:
            victim = next((rid for rid, r in self._records.items() if r.final), None)
            self._records.pop(victim if victim is not None else next(iter(self._records)))
        return record

    def get(self, request_id: str) -> RequestRecord | None:
        with self._lock:
            record = self._records.get(request_id)
            return None if record is None else record.copy()

    def active(self, kind: str | None = None) -> list[RequestRecord]:
        """Requests not yet final (of ``kind``, None: all), oldest first."""
        with self._lock:
            return [r.copy() for r in self._records.values() if not r.final and kind in (None, r.kind)]

    def latest(self, kind: str = DETECTOR) -> RequestRecord | None:
        """The running (oldest unfinished) request of ``kind``, else the most recently seen one."""
        with self._lock:
            records = [r for r in self._records.values() if r.kind == kind]
            active = [r for r in records if not r.final]
            if active:
                return min(active, key=lambda r: r.created).copy()
            if not records:
                return None
            return max(records, key=lambda r: r.created).copy()

    def logs(self, n: int) -> list[RequestRecord]:
        """The last ``n`` acquisitions that started and finished (completed or interrupted, not failed:
        REST v2 logged only those), newest first."""
        with self._lock:
            return [r.copy() for r in list(self._logs)[:n]]

    def request_kill(self, request_id: str, finish: bool = False) -> RequestRecord | None:
        with self._lock:
            record = self._records.get(request_id)
            if record is None:
                return None
            if not record.final:
                record.kill_requested = True
                record.finish_requested = finish
            return record.copy()

    def fail_unstarted(self, kind: str, older_than: float) -> list[str]:
        """Mark failed the requests of ``kind`` that no service answered at all for ``older_than``
        seconds since they were registered, and those with several expected services whose first one
        ended while another has not ended for ``older_than`` s since the last status; returns their
        ids."""
        limit = time.monotonic() - older_than
        with self._lock:
            ids = [r.request_id for r in self._records.values()
                   if r.kind == kind and r.state is RequestState.QUEUED and not r.services
                   and r.last_activity < limit]
            ended = (Action.SUCCESS.value, Action.FAIL.value)
            # several expected services (readout hosts): the first one ended, others stay silent
            silent = {r.request_id: [s for s in r.expected_services if r.services.get(s) not in ended]
                      for r in self._records.values()
                      if r.kind == kind and not r.final and r.expected_services
                      and r.services.get(r.expected_services[0]) in ended and r.last_activity < limit}
        for request_id in ids:
            self.mark_failed(request_id, f"no service started the request within {older_than:g} s (the "
                                         "broker lost it, or no service took it); its deadline has passed")
        for request_id, names in silent.items():
            self.mark_failed(request_id, f"{', '.join(names)} did not end the request within "
                                         f"{older_than:g} s after the first host's writer agent did (that "
                                         "host's DAQ is down or cut off from the broker); the master file "
                                         "says what was written")
        return ids + list(silent)

    def mark_failed(self, request_id: str, message: str) -> None:
        """Give up on a request whose services never reported an end (e.g. the writer died)."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.final:
                return
            record.failures["rest"] = message
            self._finalize(record, time.time(), RequestState.FAILED)
            watchers = list(self._watchers)
            self._changed.notify_all()
        for wake in watchers:
            wake()

    # -- status messages ----------------------------------------------------------------------
    def on_status(self, status: StatusMessage, kind: RequestKind = DETECTOR) -> None:
        now, mono = time.time(), time.monotonic()
        kill_again = False
        with self._lock:
            self._last_activity = mono
            record = self._records.get(status.request_id)
            if record is None:
                record = self._insert(RequestRecord(status.request_id, None, now, kind))
            else:
                self._records.move_to_end(status.request_id)
            record.absorb_request(status.request)
            record.last_activity = mono
            if not self._answers_early_kill(record, status):
                record.services[status.source] = status.action.value
                if not record.final:
                    kill_again = self._apply(record, status, now)
            watchers = list(self._watchers)
            self._changed.notify_all()
        for wake in watchers:
            wake()
        if kill_again and self._on_kill_again is not None:
            self._on_kill_again(status.request_id, record.kind)

    @staticmethod
    def _answers_early_kill(record: RequestRecord, status: StatusMessage) -> bool:
        """A service answers a kill of a request still queued for it with ``request_fail`` "Unknown
        request id ...: nothing to kill"; the request itself ends later ("killed before it started")."""
        return (
            record.state is RequestState.QUEUED
            and record.kill_requested
            and status.action is Action.FAIL
            and isinstance(status.message, str)
            and status.message.startswith("Unknown request id")
        )

    def _apply(self, record: RequestRecord, status: StatusMessage, now: float) -> bool:
        action = status.action
        if action is Action.START:
            if record.state is RequestState.QUEUED:
                record.state = RequestState.RUNNING
                record.init_timestamp = record.init_timestamp or now
            return record.kill_requested
        # several services: the request's numbers are those of the first expected one (the writer
        # agent that writes the master file, whose counts at the end are the master's)
        numbers = not record.expected_services or status.source == record.expected_services[0]
        if action in (Action.PROGRESS, Action.SUCCESS) and numbers:
            self._apply_numbers(record, _as_dict(status.message))
            if action is Action.SUCCESS:
                record.result = status.message
        elif action is Action.FAIL:
            text = status.message if isinstance(status.message, str) else json.dumps(status.message)
            record.failures[status.source] = text or "failed (no reason given)"
        if action in FINAL_ACTIONS and all(
            a in (Action.SUCCESS.value, Action.FAIL.value) for a in record.services.values()
        ) and all(s in record.services for s in record.expected_services):
            self._finalize(record, now)
        return False

    @staticmethod
    def _apply_numbers(record: RequestRecord, data: dict[str, Any] | None) -> None:
        if data is None:
            return
        n_written = _int(data.get("n_written"))
        if n_written is not None:
            record.n_written = max(record.n_written, n_written)
        n_images = _int(data.get("n_images"))
        if n_images is not None:
            record.n_images = n_images
        for name in ("n_missing_images", "n_incomplete_images"):
            count = _int(data.get(name))
            if count is not None:
                setattr(record, name, max(getattr(record, name), count))
        if isinstance(data.get("output_file"), str):
            record.output_file = data["output_file"]
        if isinstance(data.get("warning"), str):
            record.warning = data["warning"]
        init = _float(data.get("init_timestamp"))
        if init is not None:
            record.init_timestamp = init
        end = _float(data.get("end_timestamp"))
        if end is not None:
            record.end_timestamp = end

    def _finalize(self, record: RequestRecord, now: float, state: RequestState | None = None) -> None:
        if record.failures:
            texts = list(record.failures.values())
            interrupted = record.kill_requested or all(t.lower().startswith("interrupted") for t in texts)
            record.state = state or (RequestState.INTERRUPTED if interrupted else RequestState.FAILED)
            record.message = "; ".join(texts)
        else:
            result = _as_dict(record.result) or {}
            interrupted = str(result.get("status", "")).lower() == "interrupted"
            record.state = RequestState.INTERRUPTED if interrupted else RequestState.COMPLETED
            text = result.get("message")
            record.message = (
                text if isinstance(text, str) else ("Interrupted." if interrupted else "Completed.")
            )
        record.end_timestamp = record.end_timestamp or now
        if (
            record.kind == DETECTOR
            and record.init_timestamp is not None
            and record.state is not RequestState.FAILED
        ):
            self._logs.appendleft(record.copy())

    # -- waiting ------------------------------------------------------------------------------
    def wait(self, request_id: str, timeout: float | None = None) -> RequestRecord:
        """Block until the request is final (``TimeoutError`` after ``timeout``, ``KeyError`` if unknown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                record = self._records.get(request_id)
                if record is None:
                    raise KeyError(request_id)
                if record.final:
                    return record.copy()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"request {request_id} not final after {timeout:g} s")
                self._changed.wait(remaining)

    async def wait_async(self, request_id: str, idle_timeout: float | None = None) -> RequestRecord:
        """Wait (without a thread) until the request is final.

        ``idle_timeout``: give up (:class:`IdleTimeout`) once no status arrived for that long — for a
        running request its own statuses count, for a queued one any status on the tag does (it
        waits behind another request that reports progress).
        """
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # loop closed: the waiter is gone
                pass

        with self._lock:
            self._watchers.add(wake)
        try:
            while True:
                changed.clear()
                with self._lock:
                    record = self._records.get(request_id)
                    if record is None:
                        raise KeyError(request_id)
                    if record.final:
                        return record.copy()
                    last = record.last_activity
                    if record.state is RequestState.QUEUED:
                        last = max(last, self._last_activity)
                    snapshot = record.copy()
                timeout = None
                if idle_timeout is not None:
                    timeout = last + idle_timeout - time.monotonic()
                    if timeout <= 0:
                        raise IdleTimeout(snapshot, idle_timeout)
                try:
                    await asyncio.wait_for(changed.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
        finally:
            with self._lock:
                self._watchers.discard(wake)


# -- admin interface views -----------------------------------------------------------------------


def acquisition_log(record: RequestRecord | None) -> dict[str, Any]:
    """A record as the admin interface's ``acquisition`` object."""
    if record is None:
        return {
            "state": "FINISHED",
            "message": "No acquisition yet.",
            "info": {"n_images": None, "output_file": None, "run_id": None},
            "stats": {"n_write_completed": 0, "n_write_requested": 0, "start_time": None, "stop_time": None},
        }
    n_images = record.n_images or 0
    if record.state is RequestState.COMPLETED:
        state, message = "FINISHED", "Completed."
    elif record.state is RequestState.INTERRUPTED:
        state, message = "FINISHED", "Interrupted."
    elif record.state is RequestState.FAILED:
        state, message = "FAILED", f"ERROR: {record.message or 'failed'}"
    elif record.state is RequestState.QUEUED or record.n_written == 0:
        state, message = "WAITING_IMAGES", "Waiting for images."
    elif record.n_written >= n_images:
        state, message = "FLUSHING_IMAGES", "Flushing images."
    else:
        state, message = "WRITING", "Writing images."
    return {
        "state": state,
        "message": message,
        "info": {"n_images": record.n_images, "output_file": record.output_file, "run_id": record.run_id},
        "stats": {
            "n_write_completed": record.n_written,
            "n_write_requested": record.n_written,
            "start_time": record.init_timestamp,
            "stop_time": record.end_timestamp if record.final else None,
        },
    }


# -- one write at a time -------------------------------------------------------------------------


def refuse_if_busy(tracker: RequestTracker, unstarted_bound: float) -> None:
    """:class:`Busy` (naming the running request) while a write request is queued or running; a
    request no service answered for ``unstarted_bound`` seconds is failed first (it can no longer
    start)."""
    tracker.fail_unstarted(DETECTOR, unstarted_bound)
    active = tracker.active(DETECTOR)
    if active:
        running = active[0]
        what = f", writing {running.output_file}" if running.output_file else ""
        raise Busy(
            f"Writer is busy with request {running.request_id} ({running.state.value}{what}): "
            f"this request was not queued; send it again once that one has ended, or stop it first "
            f"(POST /requests/{running.request_id}/stop)",
            running_request_id=running.request_id,
        )
