"""What the REST API drives: broker client + status tracking, detector controls, config, stats.

Kept apart from the HTTP layer so the operations (and their errors, as :class:`ApiError` with the
HTTP status they deserve) are usable and testable without a server. Request progress is tracked from
the broker's status messages, so ``write_sync`` waits exactly as long as the acquisition runs
(weakness 2: the seed gave up after a fixed 10 s) and every client sees the same state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daq_backend import ipc
from daq_backend.broker import (
    FINAL_ACTIONS,
    Action,
    BrokerClient,
    EmbeddedTransport,
    NoRouteError,
    StatusAggregator,
    StatusMessage,
    Transport,
)
from daq_backend.broker.protocol import UNREACHABLE_BOUND
from daq_backend.config import ConfigError, DetectorConfig, parse_config
from daq_backend.control.base import (
    DetectorCommandError,
    DetectorControl,
    DetectorStateError,
    DetectorUnreachableError,
    ParameterError,
)
from daq_backend.messages import FAULT_BOUND, FINAL_STATES, RequestState
from daq_backend.rest.models import DetectorRequest, RequestKind
from daq_backend.validation import explain as explain_validation
from daq_backend.writer import roots as writer_roots
from daq_backend.writer.request import RequestError, WriteRequest, parse_write_request, writer_services

_logger = logging.getLogger(__name__)

#: what a request writes: detector images (the writer agent) or EPICS channels (the EPICS writer)
DETECTOR: RequestKind = "detector"
EPICS: RequestKind = "epics"
#: the EPICS writer's default broker tag (its service name, as in the seed)
EPICS_TAG = "epics_writer"
#: seconds a sync call waits beyond the caller's ``timeout`` for the writer's own verdict
IDLE_GRACE = 5.0
#: seconds to wait for the final status after a kill/stop
KILL_TIMEOUT = 30.0
#: seconds within which a write (or a kill) is answered 503 while the broker is unreachable: the
#: publish is given up after this long (at once when the broker is known to be down), and it is the
#: request's deadline, so a request the API answered 503 for is never run later
BROKER_ANSWER_BOUND = UNREACHABLE_BOUND
#: seconds after which a request no service has answered at all is marked failed (the broker lost it
#: with a connection, or nobody took it): its deadline has passed, so it can no longer start
UNSTARTED_BOUND = BROKER_ANSWER_BOUND + FAULT_BOUND
DETECTOR_COMMANDS = ("START", "STOP", "STATUS")

StatsProvider = Callable[[], Mapping[str, Any] | None]
PreviewProvider = Callable[[], bytes]


class ApiError(Exception):
    """An operation failed in a way the client must hear about, with the HTTP status to use."""

    def __init__(self, status_code: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.extra = extra


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
        """The seed's answer ``status``: the broker action that ended the request."""
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


# -- configuration -------------------------------------------------------------------------------

_ERA_B_NAMES = {"image_height": "image_pixel_height", "image_width": "image_pixel_width"}


def config_id(config: DetectorConfig) -> str:
    text = json.dumps(config.to_json_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ConfigStore:
    """The detector config of this DAQ, changed by partial updates (a field the caller did not give —
    or gave as ``null`` — keeps its value).

    A change is only taken once ``apply`` made it live (the supervisor restarting what must restart;
    it answers with a message saying so, or raises ``ConfigNotApplied`` / ``SupervisorUnreachable``):
    without ``apply`` a change is refused, as nothing could make it take effect. An applied config is
    then written to ``path`` (atomically), if given."""

    def __init__(
        self,
        config: DetectorConfig,
        path: Path | None = None,
        apply: Callable[[DetectorConfig], str] | None = None,
    ) -> None:
        self._config = config
        self.path = path
        self.apply = apply
        self.last_message = "Initial configuration."
        self._lock = threading.Lock()
        now = time.time()
        self._deployment: dict[str, Any] = {
            "config_id": config_id(config),
            "status": "SUCCESS",
            "message": self.last_message,
            "servers": {socket.gethostname(): "Done"},
            "stats": {"start_time": now, "stop_time": now},
        }

    @property
    def config(self) -> DetectorConfig:
        return self._config

    @property
    def config_id(self) -> str:
        return str(self._deployment["config_id"])

    def deployment(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._deployment))

    def merged(self, changes: Any) -> DetectorConfig:
        """Validate ``changes`` against the current config without applying them."""
        if not isinstance(changes, dict):
            raise ApiError(422, f"config update must be a JSON object, got {type(changes).__name__}")
        current = self._config.to_json_dict()
        known = set(DetectorConfig.model_fields) | set(current) | set(_ERA_B_NAMES)
        unknown = sorted(str(k) for k in changes if k not in known)
        if unknown:
            raise ApiError(422, f"unknown config field(s): {', '.join(unknown)}")
        updates: dict[str, Any] = {_ERA_B_NAMES.get(str(k), str(k)): v for k, v in changes.items()
                                   if v is not None}
        name = updates.get("detector_name", current["detector_name"])
        if name != current["detector_name"]:
            raise ApiError(
                422,
                f"detector_name cannot change on a running DAQ ({current['detector_name']!r} -> {name!r}): "
                "its broker tag and buffers are named after it; start a DAQ with the new config instead",
            )
        try:
            return parse_config({**current, **updates})
        except ConfigError as exc:
            raise ApiError(422, str(exc)) from None

    def update(self, changes: Any) -> DetectorConfig:
        """Apply ``changes``; returns the config once it is live (``last_message`` says how)."""
        from daq_backend.reconfigure import ConfigNotApplied, SupervisorUnreachable

        new = self.merged(changes)
        with self._lock:
            if new == self._config:
                self.last_message = "The config is live (unchanged)."
                return new
            if self.apply is None:
                raise ApiError(409, "config not applied: nothing runs this DAQ's processes for this API "
                                    "(start it with `std-daq up CONFIG`, which applies changes)")
            started = time.time()
            self._deploy_state(config_id(new), "RUNNING", "Deploying.", "Deploying", started, None)
            try:
                message = self.apply(new)
            except (ConfigNotApplied, SupervisorUnreachable) as exc:
                unreachable = isinstance(exc, SupervisorUnreachable)
                detail = f"config not applied: {exc}" + ("" if unreachable else "; the previous config runs")
                self._deploy_state(config_id(new), "ERROR", detail, "Error", started, time.time())
                raise ApiError(503 if unreachable else 409, detail) from None
            if self.path is not None:
                try:
                    tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(new.to_json_dict(), indent=1))
                    os.replace(tmp, self.path)
                except OSError as exc:
                    message += f" ({self.path} not updated: {exc.strerror})"
            self._config = new
            self.last_message = message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")
            self._deploy_state(config_id(new), "SUCCESS", self.last_message, "Done", started, time.time())
            return new

    def _deploy_state(
        self, cid: str, status: str, message: str, server: str, start: float, stop: float | None
    ) -> None:
        self._deployment = {
            "config_id": cid,
            "status": status,
            "message": message,
            "servers": {socket.gethostname(): server},
            "stats": {"start_time": start, "stop_time": stop},
        }


# -- pipeline statistics -------------------------------------------------------------------------


def status_file_stats(detector_name: str) -> StatsProvider:
    """Read the supervisor's status file (``std-daq up``); None while no supervisor runs."""
    from daq_backend.supervisor import read_status

    path = Path(ipc.status_file(detector_name))

    def provider() -> Mapping[str, Any] | None:
        try:
            return read_status(path)
        except (OSError, ValueError):
            return None

    return provider


def summarize_stats(status: Mapping[str, Any] | None, config: DetectorConfig) -> dict[str, Any]:
    """Rates and losses of the pipeline from a supervisor status (``Supervisor.status()`` shape)."""
    if status is None:
        pipeline = "down"
        services: list[Mapping[str, Any]] = []
    else:
        pipeline = "stale" if status.get("stale") else "up"
        services = [s for s in status.get("services", []) if isinstance(s, Mapping)]
    image_nbytes = config.image_nbytes

    def rate(svc: Mapping[str, Any], key: str) -> float:
        value = (svc.get("rates") or {}).get(key, 0.0)
        return float(value) if isinstance(value, int | float) else 0.0

    def count(svc: Mapping[str, Any], key: str) -> int:
        value = (svc.get("counters") or {}).get(key, 0)
        return int(value) if isinstance(value, int | float) else 0

    def stream(group: list[Mapping[str, Any]]) -> dict[str, float]:
        images = sum(rate(s, "images") for s in group)
        nbytes = sum(rate(s, "bytes") for s in group) or images * image_nbytes
        return {"images_per_second": images, "bytes_per_second": nbytes}

    name = lambda s: str(s.get("name", ""))  # noqa: E731
    receivers = [s for s in services if name(s).startswith("receiver")]
    assemblers = [s for s in services if name(s).startswith(("assembler", "stream-recv"))]
    writers = [s for s in services if "writer" in name(s)]
    lost_from = receivers or assemblers
    return {
        "pipeline": pipeline,
        "updated": None if status is None else _float(status.get("updated")),
        "detector": stream(assemblers),
        "writer": stream(writers),
        "receivers": {
            "packets_per_second": sum(rate(s, "packets") for s in receivers),
            "bytes_per_second": sum(rate(s, "bytes") for s in receivers),
        },
        "rejected": {
            "bad_datagrams": sum(count(s, "bad_datagrams") for s in receivers),
            "module_id": sum(count(s, "rejected_module_id") for s in receivers),
            "out_of_range": sum(count(s, "rejected_out_of_range") for s in receivers),
            "out_of_window": sum(count(s, "rejected_out_of_window") for s in receivers),
        },
        "lost": {
            "packets": sum(count(s, "missing_packets") for s in lost_from),
            "frames_incomplete": sum(count(s, "frames_incomplete") for s in receivers),
            "images_missing_packets": sum(count(s, "images_missing_packets") for s in assemblers),
            "images_id_mismatch": sum(count(s, "images_id_mismatch") for s in assemblers),
            "missing_module_frames": sum(count(s, "missing_module_frames") for s in assemblers),
        },
        "processes": {
            name(s): {
                "pid": _int(s.get("pid")),
                "alive": s.get("alive") if isinstance(s.get("alive"), bool) else None,
                "restarts": _int(s.get("restarts")) or 0,
                "failed": str(s["failed"]) if s.get("failed") else None,
                "counters": dict(s.get("counters") or {}),
                "rates": {
                    k: float(v) for k, v in (s.get("rates") or {}).items() if isinstance(v, int | float)
                },
            }
            for s in services
        },
    }


# -- output roots --------------------------------------------------------------------------------


def check_output_root(output_file: Any, roots: Sequence[Path]) -> None:
    """403 for a file outside every output root (checked before anything else looks at the path; a
    relative path is taken inside the first root). The message names the roots and ``--output-root``."""
    if not isinstance(output_file, str) or not output_file:
        return  # a malformed path: the request validation names it precisely
    try:
        writer_roots.check_path_text(output_file)
    except ValueError:
        return
    path = writer_roots.resolve_output_path(output_file, roots)
    try:
        writer_roots.real_root_of(Path(os.path.dirname(path)), roots, path)
    except writer_roots.OutsideRootsError as exc:
        raise ApiError(403, f"output_file: {exc}") from None


# -- the backend ---------------------------------------------------------------------------------


class DaqBackend:
    """Everything the REST API talks to for one detector DAQ.

    ``controls`` maps names (case-insensitive on lookup) to detector controls; the same control may be
    listed under several names (e.g. the detector name and ``"eiger"``, so the seed's README URLs work).
    ``output_roots``: folders files may be written in (None: ``STD_DAQ_OUTPUT_ROOTS``, else the default
    data root; see ``daq_backend.writer.roots``).
    """

    def __init__(
        self,
        config: DetectorConfig,
        transport: Transport,
        *,
        controls: Mapping[str, DetectorControl] | None = None,
        stats: StatsProvider | None = None,
        preview: PreviewProvider | None = None,
        output_roots: Sequence[str | Path] | None = None,
        check_filesystem: bool = True,
        config_path: Path | None = None,
        on_config_change: Callable[[DetectorConfig], str] | None = None,
        tag: str | None = None,
        epics_tag: str | None = EPICS_TAG,
        kill_timeout: float = KILL_TIMEOUT,
        idle_grace: float = IDLE_GRACE,
        owns_transport: bool = False,
        owns_controls: bool = False,
    ) -> None:
        self.config_store = ConfigStore(config, config_path, on_config_change)
        self.transport = transport
        self.tag = tag or config.detector_name
        self.client = BrokerClient(transport, self.tag)
        self.aggregator = StatusAggregator(transport, tag=self.tag)
        self.tracker = RequestTracker(on_kill_again=self._kill_again)
        self.aggregator.add_listener(self.tracker.on_status)
        self.epics_tag = epics_tag
        self.epics_client = BrokerClient(transport, epics_tag) if epics_tag else None
        self.epics_aggregator = StatusAggregator(transport, tag=epics_tag) if epics_tag else None
        if self.epics_aggregator is not None:
            self.epics_aggregator.add_listener(lambda status: self.tracker.on_status(status, EPICS))
        self.controls: dict[str, DetectorControl] = dict(controls or {})
        self._control_locks: dict[int, threading.Lock] = {
            id(c): threading.Lock() for c in self.controls.values()
        }
        self.stats_provider = stats
        self.preview_provider = preview
        self.output_roots: list[Path] = writer_roots.output_roots(output_roots)
        self.check_filesystem = check_filesystem
        self.kill_timeout = kill_timeout
        self.idle_grace = idle_grace
        self.owns_transport = owns_transport
        self.owns_controls = owns_controls
        self.started_at = time.monotonic()
        self._started = False
        #: makes "is the writer free?" and registering the new request one step (one write at a time)
        self._submit_lock = threading.Lock()

    @property
    def config(self) -> DetectorConfig:
        return self.config_store.config

    @property
    def broker_kind(self) -> str:
        return "embedded" if isinstance(self.transport, EmbeddedTransport) else "amqp"

    def broker_health(self) -> dict[str, Any]:
        """Whether this API reaches its broker now (the ``broker*`` fields of ``/health``)."""
        up = self.transport.connected
        return {
            "broker": "up" if up else "down",
            "broker_kind": self.broker_kind,
            "broker_where": self.transport.where,
            "broker_error": None if up else self.transport.last_error,
        }

    def start(self) -> DaqBackend:
        if not self._started:
            self.aggregator.start()
            if self.epics_aggregator is not None:
                self.epics_aggregator.start()
            self._started = True
        return self

    def close(self) -> None:
        if self._started:
            self.aggregator.stop()
            if self.epics_aggregator is not None:
                self.epics_aggregator.stop()
            self._started = False
        if self.owns_controls:
            for control in {id(c): c for c in self.controls.values()}.values():
                try:
                    control.close()
                except Exception:
                    _logger.exception("closing detector control %r failed", control)
        if self.owns_transport:
            self.transport.close()

    def __enter__(self) -> DaqBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------
    def validate_write(self, body: Any) -> WriteRequest:
        """The writer's own validation plus this API's output roots (403) before anything is sent."""
        if isinstance(body, dict):
            check_output_root(body.get("output_file"), self.output_roots)
        try:
            return parse_write_request(
                body, output_roots=self.output_roots, check_filesystem=self.check_filesystem
            )
        except RequestError as exc:
            raise ApiError(422, str(exc)) from None

    def submit_write(self, request: WriteRequest, *, run_id: int | str | None = None) -> str:
        """Publish a validated write request to the writer agent on this DAQ's tag; returns its id.

        One write at a time: while a write request is queued or running, another is refused (409
        naming the running one), never queued. Its answer comes within ``BROKER_ANSWER_BOUND`` also
        when the broker is unreachable (503), and the request carries that as its deadline."""
        body = request.to_json_dict()
        if run_id is not None:
            body["metadata"] = {**body.get("metadata", {}), "run_id": run_id}
        with self._submit_lock:
            self.check_writer_free()
            request_id = self._register(DETECTOR, body, run_id)
        return self._publish(self.client, DETECTOR, body, request_id)

    def check_writer_free(self) -> None:
        """409 while a write request of this DAQ is queued or running."""
        self.tracker.fail_unstarted(DETECTOR, UNSTARTED_BOUND)
        active = self.tracker.active(DETECTOR)
        if active:
            running = active[0]
            what = f", writing {running.output_file}" if running.output_file else ""
            raise ApiError(
                409,
                f"Writer is busy with request {running.request_id} ({running.state.value}{what}): "
                f"this request was not queued; send it again once that one has ended, or stop it first "
                f"(POST /requests/{running.request_id}/stop)",
                running_request_id=running.request_id,
            )

    def _register(self, kind: RequestKind, body: dict[str, Any], run_id: Any = None) -> str:
        request_id = _new_request_id()
        expected = writer_services(list(self.config.host_regions)) if kind == DETECTOR else ()
        self.tracker.register(request_id, body, run_id=run_id, kind=kind, expected_services=expected)
        return request_id

    def _publish(self, client: BrokerClient, kind: str, body: dict[str, Any], request_id: str) -> str:
        if not self.transport.connected:
            why = f"broker unreachable ({self.transport.where}: {self.transport.last_error})"
            self.tracker.mark_failed(request_id, f"not sent: {why}")
            raise ApiError(503, f"{why}; the request was not sent and will never run", request_id=request_id)
        # a detector write must start now or never (the writer refuses one while busy); an EPICS write
        # may wait in the EPICS writer's queue behind another, so it has no deadline
        deadline = time.time() + BROKER_ANSWER_BOUND if kind == DETECTOR else None
        try:
            client.request(body, request_id=request_id, deadline=deadline, timeout=BROKER_ANSWER_BOUND)
        except NoRouteError:
            self.tracker.forget(request_id)
            if kind == DETECTOR:
                what = "writer agent"
                hint = (
                    f"start the writer of {self.config.detector_name!r} (it serves the detector name as tag)"
                )
            else:
                what, hint = (
                    "EPICS writer",
                    "start `std-daq epics-writer` (it serves its service name as tag)",
                )
            raise ApiError(503, f"no {what} is listening on tag {client.tag!r}: {hint}") from None
        except ConnectionError as exc:
            self.tracker.mark_failed(request_id, f"not sent: broker unreachable ({exc})")
            raise ApiError(503, f"broker unreachable: {exc}; the request was not sent and will never run",
                           request_id=request_id) from None
        return request_id

    def submit_epics(self, body: Any) -> str:
        """Validate an EPICS write request (``start_pulse_id``, ``stop_pulse_id``, ``channels``,
        ``output_file``, ...) and publish it to the EPICS writer; returns its request id."""
        from daq_backend.epics.writer import EpicsRequestError, parse_request

        if self.epics_client is None:
            raise ApiError(404, "this DAQ serves no EPICS writer (no EPICS tag configured)")
        if not isinstance(body, dict):
            raise ApiError(422, f"request body must be a JSON object, got {type(body).__name__}")
        check_output_root(body.get("output_file"), self.output_roots)
        try:
            request = parse_request(body)
        except EpicsRequestError as exc:
            raise ApiError(422, f"invalid EPICS write request: {exc}") from None
        body = request.model_dump(mode="json")
        return self._publish(self.epics_client, EPICS, body, self._register(EPICS, body))

    async def wait_final(self, request_id: str, timeout: float | None) -> RequestRecord:
        """Wait until the request ends; with ``timeout`` (the writer's idle timeout) give up when no
        status came for ``timeout + idle_grace`` s: 504, and the request keeps running."""
        idle = None if timeout is None else timeout + self.idle_grace
        try:
            return await self.tracker.wait_async(request_id, idle)
        except KeyError:
            raise ApiError(404, f"unknown request_id {request_id!r}") from None
        except IdleTimeout:
            raise ApiError(
                504,
                f"request {request_id} sent no status for {idle:g} s; it was not stopped: "
                f"poll GET /requests/{request_id} or stop it",
                request_id=request_id,
            ) from None

    def record(self, request_id: str) -> RequestRecord:
        self.tracker.fail_unstarted(DETECTOR, UNSTARTED_BOUND)
        record = self.tracker.get(request_id)
        if record is None:
            raise ApiError(
                404, f"unknown request_id {request_id!r} (the last {self.tracker.max_records} are kept)"
            )
        return record

    def kill(self, request_id: str, finish: bool = False) -> RequestRecord:
        """Ask the services to stop ``request_id`` (404 if never seen; a no-op once it is final).
        ``finish``: end it as done with what it has (an open-ended acquisition that is over) instead
        of interrupting it."""
        record = self.tracker.request_kill(request_id, finish)
        if record is None:
            raise ApiError(404, f"unknown request_id {request_id!r}")
        if not record.final:
            try:
                self._client(record.kind).kill(request_id, finish=finish, timeout=BROKER_ANSWER_BOUND)
            except ConnectionError as exc:
                raise ApiError(503, f"broker unreachable, kill not sent: {exc}") from None
        return record

    async def wait_killed(self, request_id: str) -> RequestRecord:
        try:
            return await asyncio.wait_for(self.tracker.wait_async(request_id), self.kill_timeout)
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                f"request {request_id} did not end within {self.kill_timeout:g} s of the kill",
                request_id=request_id,
            ) from None

    def stop_all(self) -> list[str]:
        """Kill every unfinished request (admin ``/writer/stop``); returns their ids."""
        ids = [r.request_id for r in self.tracker.active(DETECTOR)]
        for request_id in ids:
            self.kill(request_id)
        return ids

    async def settle_stopped(self, request_ids: Sequence[str]) -> None:
        """Wait for killed requests to end; one that does not within ``kill_timeout`` is marked failed
        (its writer is gone), which resets the admin state to READY as REST v2's stop did."""
        for request_id in request_ids:
            try:
                await asyncio.wait_for(self.tracker.wait_async(request_id), self.kill_timeout)
            except (asyncio.TimeoutError, KeyError):
                self.tracker.mark_failed(
                    request_id, f"no final status within {self.kill_timeout:g} s of the stop; marked failed"
                )

    def _client(self, kind: str) -> BrokerClient:
        return self.epics_client if kind == EPICS and self.epics_client is not None else self.client

    def _kill_again(self, request_id: str, kind: str) -> None:
        record = self.tracker.get(request_id)
        try:
            self._client(kind).kill(request_id, finish=record is not None and record.finish_requested)
        except ConnectionError:
            _logger.exception("re-sending kill for %s failed", request_id)

    def writer_status(self, request_id: str | None = None) -> dict[str, Any]:
        """The admin interface's writer status; ``request_id``: describe that request (the answer to
        its submission) rather than the latest one."""
        active = self.tracker.active(DETECTOR)
        record = self.tracker.get(request_id) if request_id is not None else self.tracker.latest()
        return {
            "state": "WRITING" if active else "READY",
            "acquisition": acquisition_log(record),
        }

    # -- detectors ----------------------------------------------------------------------------
    def find_control(self, name: str) -> tuple[str, DetectorControl]:
        if name in self.controls:
            return name, self.controls[name]
        for key, control in self.controls.items():
            if key.casefold() == name.casefold():
                return key, control
        known = ", ".join(sorted(self.controls)) or "none configured"
        raise ApiError(404, f"unknown detector {name!r} (known: {known})")

    def _locked(self, control: DetectorControl) -> threading.Lock:
        return self._control_locks.setdefault(id(control), threading.Lock())

    def detector_config(self, name: str) -> dict[str, Any]:
        key, control = self.find_control(name)
        with self._locked(control), _control_errors():
            values = dict(control.get_config())
        values["det_name"] = key
        return values

    def detector_request(self, name: str | None, body: Any) -> dict[str, Any]:
        """The seed's ``POST /detector[/<name>]``: ``config`` and/or ``cmd``; answers ``{"response"}``."""
        if not isinstance(body, dict):
            raise ApiError(422, f"request body must be a JSON object, got {type(body).__name__}")
        try:
            request = DetectorRequest.model_validate(body)
        except ValidationError as exc:
            raise ApiError(422, explain_validation(exc)) from None
        if name is None and not request.det_name:
            raise ApiError(422, "det_name: missing (required on POST /detector)")
        key, control = self.find_control(name if name is not None else str(request.det_name))
        if name is not None and request.det_name and self.find_control(request.det_name)[1] is not control:
            raise ApiError(
                422, f"det_name {request.det_name!r} does not match the detector in the URL ({key!r})"
            )
        if request.config is None and request.cmd is None:
            raise ApiError(
                422, "nothing to do: give 'config' (parameters) and/or 'cmd' (START, STOP or STATUS)"
            )
        cmd = request.cmd.strip().upper() if request.cmd is not None else None
        if cmd is not None and cmd not in DETECTOR_COMMANDS:
            raise ApiError(422, f"cmd: unknown command {request.cmd!r} (expected START, STOP or STATUS)")
        answer: dict[str, Any] = {"response": "request_success"}
        with self._locked(control), _control_errors():
            if request.config is not None:
                previous_dr = control.get_config().get("dr") if "dr" in request.config else None
                control.set_config(dict(request.config))
                applied = self._follow_dynamic_range(control, request.config, previous_dr)
                if applied:
                    answer["response"] = f"request_success ({applied})"
            if cmd == "START":
                control.start()
            elif cmd == "STOP":
                control.stop()
            elif cmd == "STATUS":
                answer["status"] = control.status()
        return answer

    def _follow_dynamic_range(
        self, control: DetectorControl, values: Mapping[str, Any], previous_dr: Any
    ) -> str | None:
        """Keep the DAQ's ``bit_depth`` equal to the detector's ``dr``, else the readout would mis-size
        every frame: a new ``dr`` is applied to the DAQ (the supervisor restarts the pipeline) and the
        answer says it is live; when the DAQ cannot follow, the detector is set back to its previous
        ``dr`` and the request refused with the reason."""
        dr = values.get("dr")
        if (
            dr is None
            or getattr(control, "name", None) != self.config.detector_name
            or dr == self.config.bit_depth
        ):
            return None
        try:
            self.update_config({"bit_depth": dr})
        except ApiError as exc:
            if previous_dr is not None:
                control.set_config({"dr": previous_dr})
            raise ApiError(
                exc.status_code,
                f"dr={dr} not applied, the detector keeps dr={previous_dr}: the DAQ's bit_depth cannot "
                f"follow ({exc.detail})",
            ) from None
        return f"DAQ bit_depth={dr}: {self.config_store.last_message}"

    # -- config, stats, preview ---------------------------------------------------------------
    def update_config(self, changes: Any) -> DetectorConfig:
        if self.tracker.active(DETECTOR):
            raise ApiError(
                409, "cannot change the DAQ config while a write request is running; stop it first"
            )
        return self.config_store.update(changes)

    def stats(self) -> dict[str, Any]:
        status = None
        if self.stats_provider is not None:
            try:
                status = self.stats_provider()
            except Exception:
                _logger.exception("stats provider failed")
        summary = summarize_stats(status, self.config)
        if self.stats_provider is None:
            summary["pipeline"] = "unknown"
        return summary

    def preview_png(self) -> bytes:
        if self.preview_provider is None:
            raise ApiError(404, "no preview source configured for this DAQ")
        try:
            return self.preview_provider()
        except LookupError as exc:
            raise ApiError(404, f"no image to preview yet: {exc}") from None


def _new_request_id() -> str:
    return str(uuid.uuid4())


@contextlib.contextmanager
def _control_errors() -> Iterator[None]:
    """Map detector-control exceptions to HTTP statuses (the seed answered all of them with 200)."""
    try:
        yield
    except ParameterError as exc:
        raise ApiError(400, str(exc)) from exc
    except DetectorStateError as exc:
        raise ApiError(409, str(exc)) from exc
    except DetectorUnreachableError as exc:
        raise ApiError(503, f"Detector unreachable: {exc}") from exc
    except DetectorCommandError as exc:
        raise ApiError(502, f"Detector refused the command: {exc}") from exc
