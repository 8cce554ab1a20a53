"""Client-side view of the ``status`` exchange: what each service reported for each request.

Same data shape as the seed's ``StatusAggregator`` (an LRU of the last 100 request ids); the
blocking ``wait_for_complete`` has no built-in 10 s cap (weakness 2): the caller gives the timeout.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daq_backend.broker.protocol import FINAL_ACTIONS, STATUS_EXCHANGE, Action, Message, Transport

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusMessage:
    """One status message as listeners see it (``request`` is the echoed body, None if unparsable)."""

    request_id: str
    action: Action
    source: str
    message: Any
    request: dict[str, Any] | None


def _parse_request(body: bytes) -> dict[str, Any] | None:
    try:
        request = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):  # not JSON, or nested past the parser
        return None
    return request if isinstance(request, dict) else None


class StatusAggregator:
    """Collects ``status[request_id] = {"request": body, "services": {source: [(action, message), ...]}}``.

    Listens on ``status`` with binding key ``tag``; call ``start()`` before sending requests.
    Listener callbacks run on the transport's delivery thread, after the state was updated.
    """

    def __init__(self, transport: Transport, tag: str = "#", max_requests: int = 100,
                 queue: str | None = None) -> None:
        """``queue``: a name the status queue keeps across restarts of this process (see
        ``Transport.consume``): statuses sent while it restarts wait for it (None: a queue of its own)."""
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.transport = transport
        self.tag = tag
        self.max_requests = max_requests
        self.queue = queue
        self._status: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._condition = threading.Condition()
        self._listeners: list[Callable[[StatusMessage], None]] = []
        self._cancel: Callable[[], None] | None = None

    def start(self) -> None:
        if self._cancel is None:
            self._cancel = self.transport.consume(STATUS_EXCHANGE, self.tag, self._on_message,
                                                  queue=self.queue)

    def stop(self) -> None:
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    def __enter__(self) -> StatusAggregator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_listener(self, callback: Callable[[StatusMessage], None]) -> None:
        self._listeners.append(callback)

    def status(self, request_id: str) -> dict[str, Any]:
        """A copy of what is known about ``request_id``; ``KeyError`` if nothing (or evicted)."""
        with self._condition:
            entry = self._status.get(request_id)
            if entry is None:
                raise KeyError(
                    f"No status received for request id {request_id} (the last {self.max_requests} are kept)"
                )
            return self._copy(entry)

    def wait_for_complete(self, request_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until every service that reported on ``request_id`` reported success or fail.

        Returns ``{"status", "request_details", "services"}``; ``status`` is ``request_fail`` if any
        service failed, else ``request_success``. Raises ``TimeoutError`` after ``timeout`` seconds
        (None: wait for ever).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while True:
                entry = self._status.get(request_id)
                if entry is not None and entry["services"]:
                    last_actions = [reports[-1][0] for reports in entry["services"].values()]
                    if all(action in FINAL_ACTIONS for action in last_actions):
                        copy = self._copy(entry)
                        return {
                            "status": Action.FAIL if Action.FAIL in last_actions else Action.SUCCESS,
                            "request_details": copy["request"],
                            "services": copy["services"],
                        }
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    known = "no status at all" if entry is None else f"statuses so far: {entry['services']}"
                    raise TimeoutError(f"Request {request_id} not complete after {timeout:g} s ({known})")
                self._condition.wait(remaining)

    @staticmethod
    def _copy(entry: dict[str, Any]) -> dict[str, Any]:
        return {
            "request": entry["request"],
            "services": {source: list(reports) for source, reports in entry["services"].items()},
        }

    def _on_message(self, message: Message) -> None:
        headers = message.headers
        try:
            action = Action(headers.get("action"))
        except ValueError:
            _logger.warning(
                "Ignoring status for %s with unknown action %r", message.correlation_id, headers.get("action")
            )
            return
        status = StatusMessage(
            request_id=message.correlation_id,
            action=action,
            source=str(headers.get("source", "")),
            message=headers.get("message"),
            request=_parse_request(message.body),
        )
        with self._condition:
            entry = self._status.get(status.request_id)
            if entry is None:
                entry = self._status[status.request_id] = {"request": status.request, "services": {}}
                while len(self._status) > self.max_requests:
                    self._status.popitem(last=False)
            else:
                self._status.move_to_end(status.request_id)
                if entry["request"] is None:
                    entry["request"] = status.request
            entry["services"].setdefault(status.source, []).append((status.action, status.message))
            self._condition.notify_all()
        for listener in list(self._listeners):
            try:
                listener(status)
            except Exception:
                _logger.exception("Status listener %r failed", listener)
