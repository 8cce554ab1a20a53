"""The writer part of :class:`~std_daq_ophyd.detector.StdDaqDetector`: one HDF5 file per run.

``StdDaqWriter`` is an ophyd ``Device`` so that where the data goes (folder, file-name template,
compression) is configuration a scientist can set and that is recorded in the descriptor, and so
that the file actually written and the images in it are signals. It opens the file with one
``/write_async`` request and follows it with ``GET /requests/<id>``; the detector part decides when.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, Signal

from daq_backend.messages import FINAL_STATES, OPEN_ENDED
from daq_backend.rest.models import RequestStatus
from daq_backend.writer.roots import default_data_root
from std_daq_ophyd.client import StdDaqClient, StdDaqError

DEFAULT_TEMPLATE = "{name}_{date:%Y%m%d-%H%M%S}_{uid}.h5"


def default_output_dir() -> str:
    """``STD_DAQ_DATA_DIR`` if set, else the DAQ's default data root as it is on this host
    (``$XDG_DATA_HOME/std-daq``, ``~/.local/share/std-daq``): right for a DAQ on this host run by this
    user; a DAQ elsewhere or with ``--output-root`` needs ``output_dir`` (or ``STD_DAQ_DATA_DIR``) set
    to a folder inside its roots."""
    return os.environ.get("STD_DAQ_DATA_DIR") or str(default_data_root())


@dataclass(frozen=True)
class WriterProgress:
    """One look at the write request (``GET /requests/<id>``)."""

    state: str
    n_written: int
    n_missing: int
    n_incomplete: int
    output_file: str | None
    message: str | None
    started: bool

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def n_bad(self) -> int:
        """Images written but not good: lost (zero rows) or incomplete (missing packets, id mismatch)."""
        return self.n_missing + self.n_incomplete

    @classmethod
    def from_status(cls, status: RequestStatus | Mapping[str, Any]) -> WriterProgress:
        if isinstance(status, RequestStatus):
            status = status.model_dump(mode="json")
        services = status.get("services") or {}
        return cls(
            state=str(status.get("state")),
            n_written=int(status.get("n_written") or 0),
            n_missing=int(status.get("n_missing_images") or 0),
            n_incomplete=int(status.get("n_incomplete_images") or 0),
            output_file=status.get("output_file"),
            message=status.get("message"),
            # the agent reports progress only once the h5 writer created the file and it follows images
            started=any(action == "request_progress" for action in services.values()),
        )


class StdDaqWriter(Device):
    """File writing of one std-daq detector (used as the ``writer`` component of the detector)."""

    output_dir = Cpt(Signal, value="", kind="config", doc="folder of the files (on the DAQ host)")
    file_template = Cpt(Signal, value=DEFAULT_TEMPLATE, kind="config",
                        doc="str.format template; fields: name, detector, date, uid, count")
    compression = Cpt(Signal, value="none", kind="config", doc="none or bitshuffle-lz4")
    file_name = Cpt(Signal, value="", kind="config", doc="the file being (or last) written")
    images_written = Cpt(Signal, value=0, kind="hinted", doc="images in the file, flushed to disk")
    request_id = Cpt(Signal, value="", kind="omitted")

    def __init__(self, prefix: str = "", *, client: StdDaqClient | None = None, **kwargs: Any) -> None:
        super().__init__(prefix, **kwargs)
        self._client = client
        self._count = 0
        self._lock = threading.Lock()
        self.last: WriterProgress | None = None
        if not self.output_dir.get():
            self.output_dir.put(default_output_dir())

    @property
    def client(self) -> StdDaqClient:
        client = self._client if self._client is not None else getattr(self.parent, "client", None)
        if client is None:
            raise RuntimeError(f"{self.name}: no std-daq client (give client=, or use it in StdDaqDetector)")
        return client

    @property
    def is_open(self) -> bool:
        return bool(self.request_id.get())

    def make_path(self, detector: str) -> str:
        """The next file name: ``output_dir / file_template`` filled in."""
        template = str(self.file_template.get())
        fields = {"name": self.parent.name if self.parent is not None else self.name, "detector": detector,
                  "date": dt.datetime.now(), "uid": uuid.uuid4().hex[:8], "count": self._count}
        try:
            name = template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{self.file_template.name}: {template!r} cannot be filled in ({exc!r}); "
                             f"fields are {', '.join(fields)}") from None
        if not name or os.path.isabs(name) or name.endswith(os.sep):
            raise ValueError(f"{self.file_template.name}: {template!r} gives {name!r}, not a relative path")
        folder = str(self.output_dir.get())
        if not os.path.isabs(folder):
            raise ValueError(f"{self.output_dir.name}: must be an absolute folder, got {folder!r}")
        path = os.path.normpath(os.path.join(folder, name))
        try:  # for a DAQ on this host; a remote DAQ host checks the folder itself
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError:
            pass
        return path

    # -- one file -----------------------------------------------------------------------------
    def open(self, detector: str, n_images: int | None = None, metadata: dict[str, Any] | None = None,
             timeout: float = 60.0, poll: float = 0.05) -> str:
        """Start a write request and wait until the writer follows the image stream; returns the path."""
        if self.is_open:
            raise RuntimeError(f"{self.name}: a file is already open ({self.file_name.get()})")
        path = self.make_path(detector)
        request: dict[str, Any] = {
            "output_file": path,
            "n_images": int(n_images or OPEN_ENDED),
            "compression": str(self.compression.get()),
            "metadata": {"ophyd_device": self.parent.name if self.parent is not None else self.name,
                         **(metadata or {})},
        }
        request_id = self.client.write_async(request)
        self._count += 1
        self.request_id.put(request_id)
        self.file_name.put(path)
        self.images_written.put(0)
        deadline = time.monotonic() + timeout
        while True:
            progress = self.poll()
            if progress.started and not progress.final:
                return path
            if progress.final:
                self.request_id.put("")
                raise StdDaqError(f"the writer could not start {path}: {progress.message}")
            if time.monotonic() > deadline:
                self.abort()
                raise StdDaqError(f"the writer did not start {path} within {timeout:g} s (state "
                                  f"{progress.state}: busy with another request?); request withdrawn")
            time.sleep(poll)

    def poll(self) -> WriterProgress:
        """Fetch the request's progress; updates ``images_written``."""
        request_id = self.request_id.get()
        if not request_id:
            raise RuntimeError(f"{self.name}: no file is open")
        progress = WriterProgress.from_status(self.client.request_status(request_id))
        with self._lock:
            self.last = progress
        if progress.n_written != self.images_written.get():
            self.images_written.put(progress.n_written)
        return progress

    def close(self) -> WriterProgress | None:
        """End the file now, keeping what was written (*completed*); returns the final progress."""
        return self._end(finish=True)

    def abort(self) -> WriterProgress | None:
        """Kill the request: the file is closed as *interrupted* and holds what was written."""
        return self._end(finish=False)

    def _end(self, finish: bool) -> WriterProgress | None:
        request_id = self.request_id.get()
        if not request_id:
            return None
        try:
            status = self.client.stop_request(request_id, finish=finish)
            progress = WriterProgress.from_status(status)
            if not progress.final:  # answered 202: not ended within the backend's kill timeout
                progress = self._wait_final(request_id, 60.0)
        finally:
            self.request_id.put("")
        self.last = progress
        self.images_written.put(progress.n_written)
        return progress

    def _wait_final(self, request_id: str, timeout: float) -> WriterProgress:
        deadline = time.monotonic() + timeout
        while True:
            progress = WriterProgress.from_status(self.client.request_status(request_id))
            if progress.final or time.monotonic() > deadline:
                return progress
            time.sleep(0.1)

    def stop(self, *, success: bool = False) -> None:
        """Stop writing: the open request (if any) is killed and its file closed, valid."""
        self.abort()
        super().stop(success=success)
