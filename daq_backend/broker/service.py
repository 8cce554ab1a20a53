"""The service side of the protocol: run one request at a time, report it on ``status``.

Behaves like the seed's ``BrokerService`` on the wire: malformed bodies and kills of unknown ids get
a clear ``request_fail`` instead of killing the consumer or being ignored, and the callback gets a
context with a kill flag and a progress publisher.

Admission of a request, in this order: a redelivered id is ignored (each id runs once); a request
killed before it arrived is refused; a request whose ``deadline`` header has passed is refused as
``expired: ...`` (its client gave up on it: it never runs late); with ``reject_when_busy`` a request
that arrives while another runs is refused with ``busy: ...`` naming the running one (never queued).
Refusals are ``request_fail`` without a ``request_start``.

While the broker is unreachable, progress is dropped (the next one after the reconnect says it all)
and the final status of a request is retried until it is out, so a request that ran through an outage
still reports how it ended once the broker is back.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daq_backend.broker.protocol import (
    DEADLINE_HEADER,
    FINAL_ACTIONS,
    KILL_EXCHANGE,
    REQUEST_EXCHANGE,
    STATUS_EXCHANGE,
    UNREACHABLE_BOUND,
    Action,
    Message,
    Transport,
)

_logger = logging.getLogger(__name__)

_REMEMBERED_IDS = 1000
#: seconds between attempts to publish a final status while the broker is unreachable
_FINAL_RETRY_S = 1.0


@dataclass
class RequestContext:
    """What ``on_request`` gets: the request, a flag set when it is killed, and a way to report
    progress. Without ``progress_callback`` (a context built outside a service, e.g. in a unit
    test) progress goes nowhere."""

    request_id: str
    request: dict[str, Any]
    killed: threading.Event = field(default_factory=threading.Event)
    #: the kill asked to *finish* the request now — end it as done with what it has — rather than
    #: abort it (kill body ``{"finish": true}``; e.g. an open-ended acquisition that is over)
    finish: bool = False
    progress_callback: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)

    def publish_progress(self, message: Any) -> None:
        """Publish a ``request_progress`` status (JSON-serialisable ``message``)."""
        if self.progress_callback is not None:
            self.progress_callback(message)


def request_deadline(message: Message) -> float | None:
    """The request's ``deadline`` header (``time.time()`` seconds), None if it has none (or a bad one)."""
    value = message.headers.get(DEADLINE_HEADER)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class BrokerService:
    """Consumes ``request`` (binding key ``tag``, one request at a time) and ``kill``.

    For each request: ``request_start``, then ``on_request(ctx)`` in a worker thread, then
    ``request_success`` with its (JSON-serialisable) return value or ``request_fail`` with the
    exception text. Status routing key = the request's routing key (the tag itself unless the tag is
    a wildcard), ``correlation_id`` = request id, body = the request body echoed.

    ``reject_when_busy``: a request that arrives while one runs is refused (``request_fail`` "busy:
    ...", naming the running request); otherwise (the seed's behaviour) it waits in the broker's
    queue until the running one ended. See the module docstring for the other refusals.
    """

    def __init__(
        self,
        transport: Transport,
        service_name: str,
        tag: str,
        on_request: Callable[[RequestContext], Any],
        on_kill: Callable[[str], None] | None = None,
        *,
        stop_timeout: float = 30.0,
        reject_when_busy: bool = False,
    ) -> None:
        self.transport = transport
        self.service_name = service_name
        self.tag = tag
        self._on_request = on_request
        self._on_kill = on_kill
        self._stop_timeout = stop_timeout
        self.reject_when_busy = reject_when_busy
        self._lock = threading.Lock()
        self._current: RequestContext | None = None
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._killed_early: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cancels: list[Callable[[], None]] = []
        self._stopping = threading.Event()
        #: requests admitted and not yet reported; ``_idle`` is set while there are none
        self._unreported = 0
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        if self._cancels:
            raise RuntimeError(f"Service {self.service_name!r} already started")
        self._stopping.clear()
        self._cancels.append(self.transport.consume(KILL_EXCHANGE, self.tag, self._on_kill_message))
        self._cancels.append(
            self.transport.consume(REQUEST_EXCHANGE, self.tag, self._on_request_message, exclusive_work=True,
                                   queue=f"std-daq-{REQUEST_EXCHANGE}-{self.tag}-{self.service_name}")
        )
        _logger.info("Service %r serving requests on tag %r", self.service_name, self.tag)

    def stop(self) -> None:
        """Stop consuming; a running request is killed and given ``stop_timeout`` to report."""
        self._stopping.set()
        cancels, self._cancels = self._cancels, []
        if cancels:
            cancels[0]()  # no more kills delivered: we are about to kill ourselves
        with self._lock:
            current = self._current
        if current is not None:
            self._kill(current)
            if not self._idle.wait(self._stop_timeout):
                _logger.warning("Request %s still running after %g s", current.request_id, self._stop_timeout)
        for cancel in cancels[1:]:
            cancel()

    def report(self, action: Action, request_id: str, routing_key: str, request: dict[str, Any],
               message: Any) -> None:
        """Publish a status of a request this service is not running (one a predecessor of this
        process left unfinished when it died)."""
        self._publish_status(action, request_id, routing_key, json.dumps(request).encode(), message)

    @property
    def current_request_id(self) -> str | None:
        with self._lock:
            return None if self._current is None else self._current.request_id

    # ------------------------------------------------------------------ status

    def _publish_status(
        self, action: Action, request_id: str, routing_key: str, body: bytes, message: Any
    ) -> None:
        status = Message(
            exchange=STATUS_EXCHANGE,
            routing_key=routing_key,
            body=body,
            correlation_id=request_id,
            headers={"action": action.value, "source": self.service_name, "message": message},
        )
        # a final status waits for the broker; anything else is given up on after a bounded time
        timeout = None if action in FINAL_ACTIONS else UNREACHABLE_BOUND
        while True:
            try:
                self.transport.publish(status, timeout=timeout)
                return
            except ConnectionError as exc:
                if action not in FINAL_ACTIONS or self._stopping.is_set():
                    _logger.error("Service %r could not publish %s for %s: %s", self.service_name,
                                  action.value, request_id, exc)
                    return
                _logger.warning("Service %r could not publish %s for %s yet (%s); retrying",
                                self.service_name, action.value, request_id, exc)
                self._stopping.wait(_FINAL_RETRY_S)

    # ------------------------------------------------------------------ requests

    def _on_request_message(self, message: Message) -> None:
        request_id = message.correlation_id
        if not request_id:
            request_id = str(uuid.uuid4())
            _logger.warning(
                "Request without correlation_id on %r; calling it %s", message.routing_key, request_id
            )
        reply = (request_id, message.routing_key, message.body)
        ctx = RequestContext(request_id=request_id, request={})
        deadline = request_deadline(message)
        late = None if deadline is None else time.time() - deadline
        busy: RequestContext | None = None
        with self._lock:
            duplicate = request_id in self._seen
            self._remember(self._seen, request_id)
            killed_early = request_id in self._killed_early
            if killed_early:
                del self._killed_early[request_id]
            elif duplicate or (late is not None and late > 0):
                pass  # answered (or ignored) below, outside the lock; it never becomes the current request
            elif self._current is not None and self.reject_when_busy:
                busy = self._current
            else:
                self._current = ctx  # from here on a kill finds it
                self._unreported += 1
                self._idle.clear()
        if duplicate:
            # A redelivery (broker channel recovery, a publish retried across a reconnect): each
            # request id runs at most once.
            _logger.warning("Request %s delivered again to %r; ignored", request_id, self.service_name)
            return
        if killed_early:
            self._publish_status(Action.FAIL, *reply, f"Request {request_id} was killed before it started")
            return
        if late is not None and late > 0 and message.redelivered:
            # The previous process of this service took it and died (its queue keeps the service's
            # name): that process's own recovery ends the request; a second final status would not
            # be the truth about what ran.
            _logger.warning("Request %s redelivered to %r after its previous consumer died; not run",
                            request_id, self.service_name)
            return
        if late is not None and late > 0:
            _logger.warning("Request %s reached %r %.1f s after its deadline; refused", request_id,
                            self.service_name, late)
            self._publish_status(
                Action.FAIL, *reply,
                f"expired: request {request_id} reached {self.service_name} {late:.1f} s after its "
                "deadline (its client no longer waits for it); not started",
            )
            return
        if busy is not None:
            self._publish_status(Action.FAIL, *reply, self._busy_message(busy))
            return
        worker: threading.Thread | None = None
        try:
            worker = self._serve(ctx, message, reply)
        finally:
            if worker is None:
                self._release(ctx)
                self._reported()
        if worker is None or self.reject_when_busy:
            return  # refused; or running, and the next delivery may come now (refused while this runs)
        # Block the delivery thread until the request is over: that (prefetch 1 + ack on return)
        # is what makes the service run one request at a time, the next one waiting in the queue.
        while worker.is_alive():
            worker.join(timeout=0.5)
            if self._stopping.is_set():
                worker.join(timeout=self._stop_timeout)
                return

    def _busy_message(self, running: RequestContext) -> str:
        output = running.request.get("output_file") if isinstance(running.request, dict) else None
        what = f" (writing {output})" if isinstance(output, str) else ""
        return (
            f"busy: {self.service_name} is running request {running.request_id}{what}; this request was "
            "not queued: send it again once that one has ended, or stop it first"
        )

    def _release(self, ctx: RequestContext) -> None:
        """The service is free for the next request (before the final status goes out: whoever
        reads it may send the next one at once)."""
        with self._lock:
            if self._current is ctx:
                self._current = None

    def _reported(self) -> None:
        with self._lock:
            self._unreported -= 1
            if self._unreported == 0:
                self._idle.set()

    def _serve(
        self, ctx: RequestContext, message: Message, reply: tuple[str, str, bytes]
    ) -> threading.Thread | None:
        """Parse and start the request in a worker thread (returned); None if it was refused."""
        try:
            request = json.loads(message.body.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            self._publish_status(Action.FAIL, *reply, f"Malformed request: body is not valid JSON ({exc})")
            return None
        except RecursionError:
            self._publish_status(Action.FAIL, *reply, "Malformed request: JSON nested too deeply")
            return None
        if not isinstance(request, dict):
            self._publish_status(
                Action.FAIL,
                *reply,
                f"Malformed request: body must be a JSON object, got {type(request).__name__}",
            )
            return None
        if ctx.killed.is_set():
            self._publish_status(
                Action.FAIL, *reply, f"Request {ctx.request_id} was killed before it started"
            )
            return None
        if self._stopping.is_set():
            self._publish_status(Action.FAIL, *reply, f"Service {self.service_name} is shutting down")
            return None
        ctx.request = request
        ctx.progress_callback = lambda progress: self._publish_progress(reply, progress)
        self._publish_status(Action.START, *reply, None)
        worker = threading.Thread(
            target=self._run_request,
            args=(ctx, reply),
            name=f"{self.service_name}-{ctx.request_id[:8]}",
            daemon=True,
        )
        worker.start()
        return worker

    def _publish_progress(self, reply: tuple[str, str, bytes], progress: Any) -> None:
        json.dumps(progress)  # a non-serialisable progress is the caller's bug: raise it there
        if not self.transport.connected:
            return  # dropped, not waited for: the request goes on while the broker is away
        self._publish_status(Action.PROGRESS, *reply, progress)

    def _run_request(self, ctx: RequestContext, reply: tuple[str, str, bytes]) -> None:
        action, message = Action.FAIL, "the request ended without a result"
        try:
            result = self._on_request(ctx)
            try:
                json.dumps(result)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"Result of service {self.service_name!r} is not JSON-serialisable: {exc}"
                ) from exc
        except Exception as exc:
            _logger.info("Request %s failed in %r: %s", ctx.request_id, self.service_name, exc, exc_info=True)
            message = str(exc) or type(exc).__name__
        else:
            action, message = Action.SUCCESS, result
        finally:
            self._release(ctx)
        try:
            self._publish_status(action, *reply, message)
        finally:
            self._reported()

    # ------------------------------------------------------------------ kills

    def _on_kill_message(self, message: Message) -> None:
        request_id = message.correlation_id
        finish = _kill_finishes(message.body)
        with self._lock:
            current = self._current
            running = current is not None and current.request_id == request_id
            seen = request_id in self._seen
            if not running and not seen:
                # It may still be queued behind the running request: refuse it when it arrives.
                self._remember(self._killed_early, request_id)
        if running:
            assert current is not None
            self._kill(current, finish)
        elif seen:
            _logger.info("Kill for %s in %r ignored: the request is over", request_id, self.service_name)
        else:
            self._publish_status(
                Action.FAIL,
                request_id,
                message.routing_key,
                message.body,
                f"Unknown request id {request_id}: nothing to kill",
            )

    def _kill(self, ctx: RequestContext, finish: bool = False) -> None:
        _logger.info("%s request %s in %r", "Finishing" if finish else "Killing", ctx.request_id,
                     self.service_name)
        if not ctx.killed.is_set():
            ctx.finish = finish
        ctx.killed.set()
        if self._on_kill is not None:
            try:
                self._on_kill(ctx.request_id)
            except Exception:
                _logger.exception("on_kill of %r failed for %s", self.service_name, ctx.request_id)

    @staticmethod
    def _remember(ids: collections.OrderedDict[str, None], request_id: str) -> None:
        ids[request_id] = None
        ids.move_to_end(request_id)
        while len(ids) > _REMEMBERED_IDS:
            ids.popitem(last=False)


def _kill_finishes(body: bytes) -> bool:
    """A kill body ``{"finish": true}`` asks to finish; anything else (the seed sends nothing) kills."""
    if not body.strip():
        return False
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("finish") is True
