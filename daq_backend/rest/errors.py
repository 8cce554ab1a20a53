"""Errors of the DAQ's operations, in the operations' own terms (no transport, no status codes).

Request tracking, the config store, the detector controls' facade and the HTTP layer's body parsing
raise these; ``daq_backend.rest.http_layer.STATUS_CODES`` maps each class to the HTTP status it is
answered with. An error carries the message the client reads and optional extra fields that go into
the answer next to it (``request_id`` of a request that was registered, ``running_request_id`` of
the request that keeps the writer busy).
"""

from __future__ import annotations

from typing import Any


class DaqError(Exception):
    """An operation failed in a way the client must hear about: ``message`` says what and why."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class Malformed(DaqError):
    """The request cannot be read at all (no JSON, an empty body)."""


class BadParameter(DaqError):
    """The detector does not take this parameter or value."""


class Forbidden(DaqError):
    """The request asks for something this DAQ never does (a file outside its output roots)."""


class NotFound(DaqError):
    """Unknown request id or detector, or nothing to show (no preview source, no image yet)."""


class Conflict(DaqError):
    """The detector, the writer or the DAQ is in the wrong state for this (e.g. a config change while a
    write runs, START while the detector runs)."""


class Busy(Conflict):
    """The writer is busy with another write request (named in ``running_request_id``): one write at a
    time, nothing is queued."""


class TooLarge(DaqError):
    """The request body is over the size limit or nested deeper than the parser takes."""


class Invalid(DaqError):
    """A field is missing, of the wrong type or out of range."""


class Refused(DaqError):
    """The detector refused a command it was able to receive."""


class Unavailable(DaqError):
    """Something this operation needs cannot be reached: the broker, the writer agent or EPICS writer
    on its tag, the detector, the supervisor."""


class TimedOut(DaqError):
    """No answer within the wait's bound; the operation itself goes on (nothing was stopped)."""
