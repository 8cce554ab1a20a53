"""Typed control-plane messages: what the writer, the writer agent, the REST API, the broker status
and the ophyd client say about a write request, defined once.

The invariant every process keeps for a request (and every interface reports the same way):

    n_requested == n_written + n_not_written          (when the request has ended)
    n_written   == n_good + n_incomplete + n_lost      (rows in the file, each with its status)

* ``n_written``: rows of the file that are complete and flushed (the file's ``n_written``);
* ``n_good``: rows with status 0;
* ``n_incomplete``: rows whose image arrived with missing packets or a module id mismatch (status 1, 2);
* ``n_lost``: rows whose image was lost inside the DAQ (status 3, zero pixels): its ring slot was
  overwritten before it was written, or the image id never arrived (a gap in the stream);
* ``n_not_written``: requested images that have no row because the request ended early
  (``end_reason`` says why: killed, timeout, a process died, no space left, ...).

``FAULT_BOUND`` is the promise of the fault suite: after any fault (a process killed, the broker
gone, a full disk), every interface (file, REST, broker status, ophyd Status) reports the same final
state of every request the fault touched within this many seconds.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Seconds within which every interface reports the final state of a request after a fault.
FAULT_BOUND = 10.0

#: ``n_images`` of a request that runs until it is stopped (the ophyd devices' one file per run)
OPEN_ENDED = 2**31 - 1


def images_of(n_written: int, n_images: int) -> str:
    """``"93 of 500 images"``, or ``"93 images (open-ended request)"`` for an :data:`OPEN_ENDED` one."""
    if n_images >= OPEN_ENDED:
        return f"{n_written} images (open-ended request)"
    return f"{n_written} of {n_images} images"


class RequestState(str, Enum):
    """Life of one write request."""

    QUEUED = "queued"  # accepted; no service has started it yet
    RUNNING = "running"  # a service started it (request_start)
    COMPLETED = "completed"  # every requested image has a row (some may be flagged: see the counts)
    #: ended early on purpose (kill, stop, timeout); the file holds what was written until then
    INTERRUPTED = "interrupted"
    FAILED = "failed"  # ended by a fault or refused; ``message`` says why


FINAL_STATES = frozenset({RequestState.COMPLETED, RequestState.INTERRUPTED, RequestState.FAILED})


class EndReason(str, Enum):
    """Why a request (and its file) ended; the file's ``end_reason`` attribute starts with this text."""

    COMPLETED = "completed"  # every requested image written
    FINISHED = "finished"  # an open-ended request ended by its client (kill with finish=true)
    KILLED = "killed"  # killed by a client (write_kill, /requests/{id}/stop, Ctrl-C of std-daq write)
    TIMEOUT = "timeout"  # no new image for the request's ``timeout`` seconds
    EXPIRED = "expired"  # the request's deadline passed before a service could start it
    SHUTDOWN = "shutdown"  # the DAQ was stopped (std-daq up ended, its supervisor died)
    WRITER_DIED = "writer died"  # the h5 writer process died during the request
    AGENT_DIED = "writer agent died"  # the writer agent process died during the request
    NO_SPACE = "no space left"  # the file system is full
    ERROR = "error"  # anything else; the message says what


class ImageAccounting(BaseModel):
    """Where every requested image of one request went (see the module docstring's invariant)."""

    model_config = ConfigDict(frozen=True)

    n_requested: int | None = Field(description="images requested (None: open-ended, until it ends)")
    n_written: int = Field(default=0, ge=0, description="complete, flushed rows in the file")
    n_good: int = Field(default=0, ge=0, description="rows with status 0 (good)")
    n_incomplete: int = Field(default=0, ge=0,
                              description="rows with missing packets or a module id mismatch")
    n_lost: int = Field(default=0, ge=0, description="rows of images lost inside the DAQ (zero pixels)")
    n_not_written: int = Field(default=0, ge=0, description="requested images without a row (ended early)")

    def balanced(self) -> bool:
        """True when the counts add up (for a request that has ended)."""
        rows = self.n_good + self.n_incomplete + self.n_lost
        if rows != self.n_written:
            return False
        return self.n_requested is None or self.n_requested == self.n_written + self.n_not_written

    def legacy(self) -> dict[str, Any]:
        """The progress keys older clients read (``n_missing_images`` = lost rows)."""
        return {"n_written": self.n_written, "n_images": self.n_requested,
                "n_missing_images": self.n_lost, "n_incomplete_images": self.n_incomplete}
