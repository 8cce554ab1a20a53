"""The REST API's facade for one detector DAQ: what every route calls, without HTTP.

:class:`DaqBackend` holds the broker clients (the writer agent's tag and the EPICS writer's), the
:class:`RequestTracker` fed by their status aggregators, the detector controls, the
:class:`ConfigStore`, the stats and preview providers and the output roots; its operations
validate, submit, wait for, stop and describe write requests, read and command the detectors, and
change the config. Failures are raised as :mod:`daq_backend.rest.errors` (the HTTP layer decides the
status codes). Request progress comes from the broker's status messages, so a ``write_sync`` waits
exactly as long as the acquisition runs and every client sees the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daq_backend.broker import (
    BrokerClient,
    EmbeddedTransport,
    NoRouteError,
    StatusAggregator,
    Transport,
)
from daq_backend.broker.protocol import UNREACHABLE_BOUND
from daq_backend.config import DetectorConfig
from daq_backend.control.base import (
    DetectorCommandError,
    DetectorControl,
    DetectorStateError,
    DetectorUnreachableError,
    ParameterError,
)
from daq_backend.messages import FAULT_BOUND
from daq_backend.rest.config_store import ConfigStore
from daq_backend.rest.errors import (
    BadParameter,
    Conflict,
    DaqError,
    Forbidden,
    Invalid,
    NotFound,
    Refused,
    TimedOut,
    Unavailable,
)
from daq_backend.rest.models import DetectorRequest, RequestKind
from daq_backend.rest.request_tracker import (
    DETECTOR,
    EPICS,
    IdleTimeout,
    RequestRecord,
    RequestTracker,
    acquisition_log,
    refuse_if_busy,
)
from daq_backend.rest.stats_summary import StatsProvider, summarize_stats
from daq_backend.validation import explain as explain_validation
from daq_backend.writer import roots as writer_roots
from daq_backend.writer.request import RequestError, WriteRequest, parse_write_request, writer_services

_logger = logging.getLogger(__name__)

#: the EPICS writer's default broker tag (its service name)
EPICS_TAG = "epics_writer"
#: seconds a sync call waits beyond the caller's ``timeout`` for the writer's own verdict
IDLE_GRACE = 5.0
#: seconds to wait for the final status after a kill/stop
KILL_TIMEOUT = 30.0
#: seconds within which a write (or a kill) is answered as unavailable while the broker is
#: unreachable: the publish is given up after this long (at once when the broker is known to be
#: down), and it is the request's deadline, so a request refused that way is never run later
BROKER_ANSWER_BOUND = UNREACHABLE_BOUND
#: seconds after which a request no service has answered at all is marked failed (the broker lost it
#: with a connection, or nobody took it): its deadline has passed, so it can no longer start
UNSTARTED_BOUND = BROKER_ANSWER_BOUND + FAULT_BOUND
DETECTOR_COMMANDS = ("START", "STOP", "STATUS")

#: returns the latest image as a PNG (``LookupError`` while there is none)
PreviewProvider = Callable[[], bytes]


# -- output roots --------------------------------------------------------------------------------


def check_output_root(output_file: Any, roots: Sequence[Path]) -> None:
    """:class:`Forbidden` for a file outside every output root (checked before anything else looks at
    the path; a relative path is taken inside the first root). The message names the roots and
    ``--output-root``."""
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
        raise Forbidden(f"output_file: {exc}") from None


# -- the backend ---------------------------------------------------------------------------------


class DaqBackend:
    """Everything the REST API talks to for one detector DAQ.

    ``controls`` maps names (case-insensitive on lookup) to detector controls; the same control may be
    listed under several names (e.g. the detector name and ``"eiger"``, so URLs naming the detector
    type work).
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
        status_queue: str | None = None,
    ) -> None:
        self.config_store = ConfigStore(config, config_path, on_config_change)
        self.transport = transport
        self.tag = tag or config.detector_name
        self.client = BrokerClient(transport, self.tag)
        # a restarted API (same host and port) finds the statuses sent while it was down in its queue
        self.aggregator = StatusAggregator(transport, tag=self.tag, queue=status_queue)
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
        """The writer's own validation plus this API's output roots (:class:`Forbidden`) before anything
        is sent."""
        if isinstance(body, dict):
            check_output_root(body.get("output_file"), self.output_roots)
        try:
            return parse_write_request(
                body, output_roots=self.output_roots, check_filesystem=self.check_filesystem
            )
        except RequestError as exc:
            raise Invalid(str(exc)) from None

    def submit_write(self, request: WriteRequest, *, run_id: int | str | None = None) -> str:
        """Publish a validated write request to the writer agent on this DAQ's tag; returns its id.

        One write at a time: while a write request is queued or running, another is refused
        (:class:`Busy` naming the running one), never queued. Its answer comes within
        ``BROKER_ANSWER_BOUND`` also when the broker is unreachable (:class:`Unavailable`), and the
        request carries that as its deadline."""
        body = request.to_json_dict()
        if run_id is not None:
            body["metadata"] = {**body.get("metadata", {}), "run_id": run_id}
        with self._submit_lock:
            self.check_writer_free()
            request_id = self._register(DETECTOR, body, run_id)
        return self._publish(self.client, DETECTOR, body, request_id)

    def check_writer_free(self) -> None:
        """:class:`Busy` while a write request of this DAQ is queued or running."""
        refuse_if_busy(self.tracker, UNSTARTED_BOUND)

    def _register(self, kind: RequestKind, body: dict[str, Any], run_id: Any = None) -> str:
        request_id = _new_request_id()
        expected = writer_services(list(self.config.host_regions)) if kind == DETECTOR else ()
        self.tracker.register(request_id, body, run_id=run_id, kind=kind, expected_services=expected)
        return request_id

    def _publish(self, client: BrokerClient, kind: str, body: dict[str, Any], request_id: str) -> str:
        if not self.transport.connected:
            why = f"broker unreachable ({self.transport.where}: {self.transport.last_error})"
            self.tracker.mark_failed(request_id, f"not sent: {why}")
            raise Unavailable(f"{why}; the request was not sent and will never run", request_id=request_id)
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
            raise Unavailable(f"no {what} is listening on tag {client.tag!r}: {hint}") from None
        except ConnectionError as exc:
            self.tracker.mark_failed(request_id, f"not sent: broker unreachable ({exc})")
            raise Unavailable(f"broker unreachable: {exc}; the request was not sent and will never run",
                              request_id=request_id) from None
        return request_id

    def submit_epics(self, body: Any) -> str:
        """Validate an EPICS write request (``start_pulse_id``, ``stop_pulse_id``, ``channels``,
        ``output_file``, ...) and publish it to the EPICS writer; returns its request id."""
        from daq_backend.epics.writer import EpicsRequestError, parse_request

        if self.epics_client is None:
            raise NotFound("this DAQ serves no EPICS writer (no EPICS tag configured)")
        if not isinstance(body, dict):
            raise Invalid(f"request body must be a JSON object, got {type(body).__name__}")
        check_output_root(body.get("output_file"), self.output_roots)
        try:
            request = parse_request(body)
        except EpicsRequestError as exc:
            raise Invalid(f"invalid EPICS write request: {exc}") from None
        body = request.model_dump(mode="json")
        return self._publish(self.epics_client, EPICS, body, self._register(EPICS, body))

    async def wait_final(self, request_id: str, timeout: float | None) -> RequestRecord:
        """Wait until the request ends; with ``timeout`` (the writer's idle timeout) give up when no
        status came for ``timeout + idle_grace`` s (:class:`TimedOut`); the request keeps running."""
        idle = None if timeout is None else timeout + self.idle_grace
        try:
            return await self.tracker.wait_async(request_id, idle)
        except KeyError:
            raise NotFound(f"unknown request_id {request_id!r}") from None
        except IdleTimeout:
            raise TimedOut(
                f"request {request_id} sent no status for {idle:g} s; it was not stopped: "
                f"poll GET /requests/{request_id} or stop it",
                request_id=request_id,
            ) from None

    def record(self, request_id: str) -> RequestRecord:
        self.tracker.fail_unstarted(DETECTOR, UNSTARTED_BOUND)
        record = self.tracker.get(request_id)
        if record is None:
            raise NotFound(
                f"unknown request_id {request_id!r} (the last {self.tracker.max_records} are kept)"
            )
        return record

    def kill(self, request_id: str, finish: bool = False) -> RequestRecord:
        """Ask the services to stop ``request_id`` (:class:`NotFound` if never seen; a no-op once it is
        final). ``finish``: end it as done with what it has (an open-ended acquisition that is over) instead
        of interrupting it."""
        record = self.tracker.request_kill(request_id, finish)
        if record is None:
            raise NotFound(f"unknown request_id {request_id!r}")
        if not record.final:
            try:
                self._client(record.kind).kill(request_id, finish=finish, timeout=BROKER_ANSWER_BOUND)
            except ConnectionError as exc:
                raise Unavailable(f"broker unreachable, kill not sent: {exc}") from None
        return record

    async def wait_killed(self, request_id: str) -> RequestRecord:
        try:
            return await asyncio.wait_for(self.tracker.wait_async(request_id), self.kill_timeout)
        except asyncio.TimeoutError:
            raise TimedOut(
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
        raise NotFound(f"unknown detector {name!r} (known: {known})")

    def _locked(self, control: DetectorControl) -> threading.Lock:
        return self._control_locks.setdefault(id(control), threading.Lock())

    def detector_config(self, name: str) -> dict[str, Any]:
        key, control = self.find_control(name)
        with self._locked(control), _control_errors():
            values = dict(control.get_config())
        values["det_name"] = key
        return values

    def detector_request(self, name: str | None, body: Any) -> dict[str, Any]:
        """``POST /detector[/<name>]``: ``config`` and/or ``cmd``; answers ``{"response"}``."""
        if not isinstance(body, dict):
            raise Invalid(f"request body must be a JSON object, got {type(body).__name__}")
        try:
            request = DetectorRequest.model_validate(body)
        except ValidationError as exc:
            raise Invalid(explain_validation(exc)) from None
        if name is None and not request.det_name:
            raise Invalid("det_name: missing (required on POST /detector)")
        key, control = self.find_control(name if name is not None else str(request.det_name))
        if name is not None and request.det_name and self.find_control(request.det_name)[1] is not control:
            raise Invalid(f"det_name {request.det_name!r} does not match the detector in the URL ({key!r})")
        if request.config is None and request.cmd is None:
            raise Invalid("nothing to do: give 'config' (parameters) and/or 'cmd' (START, STOP or STATUS)")
        cmd = request.cmd.strip().upper() if request.cmd is not None else None
        if cmd is not None and cmd not in DETECTOR_COMMANDS:
            raise Invalid(f"cmd: unknown command {request.cmd!r} (expected START, STOP or STATUS)")
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
        except DaqError as exc:
            if previous_dr is not None:
                control.set_config({"dr": previous_dr})
            raise type(exc)(
                f"dr={dr} not applied, the detector keeps dr={previous_dr}: the DAQ's bit_depth cannot "
                f"follow ({exc.message})",
            ) from None
        return f"DAQ bit_depth={dr}: {self.config_store.last_message}"

    # -- config, stats, preview ---------------------------------------------------------------
    def update_config(self, changes: Any) -> DetectorConfig:
        if self.tracker.active(DETECTOR):
            raise Conflict("cannot change the DAQ config while a write request is running; stop it first")
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
            raise NotFound("no preview source configured for this DAQ")
        try:
            return self.preview_provider()
        except LookupError as exc:
            raise NotFound(f"no image to preview yet: {exc}") from None


def _new_request_id() -> str:
    return str(uuid.uuid4())


@contextlib.contextmanager
def _control_errors() -> Iterator[None]:
    """Raise detector-control exceptions as the matching :mod:`daq_backend.rest.errors`."""
    try:
        yield
    except ParameterError as exc:
        raise BadParameter(str(exc)) from exc
    except DetectorStateError as exc:
        raise Conflict(str(exc)) from exc
    except DetectorUnreachableError as exc:
        raise Unavailable(f"Detector unreachable: {exc}") from exc
    except DetectorCommandError as exc:
        raise Refused(f"Detector refused the command: {exc}") from exc
