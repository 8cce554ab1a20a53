"""The h5 writer: StoreStream in, HDF5 files out, chunks taken straight from the image ring slot.

PULL-connects to the writer agent (``ipc.writer_agent_address``) and PUB-binds its status
(``ipc.writer_status_address``). Per StoreStream message:

* ``START``: create the file (:class:`~daq_backend.writer.layout.ImageFile`), answer ``started`` or
  ``finished`` with status ``failed: <why>``;
* ``WRITE``: ``ring.view(id)`` -> (compress) -> ``write_direct_chunk`` -> ``ring.check(id)``. A slot that
  the producer lapped before or during the write is never left as silently wrong data: the row gets
  zeros and status 3 (lost), and is counted;
* ``STOP``: close the file (``completed`` / ``interrupted`` / ``failed: ...``), answer ``finished``.

Status events (JSON on the PUB socket) keep the agent informed: ``alive`` heartbeats, ``started``,
``progress`` (flushed rows, rate limited) and ``finished``. Messages of a run this writer does not
have open are dropped (a restarted writer never writes into someone else's file); a ``STOP`` for such
a run is answered with ``finished`` / failed so the agent is never left waiting.

The image ring is the assembler's: a restarted assembler re-creates it (a new segment), and a slot
that does not hold the announced id makes the writer look whether the ring was re-created and read
the slot from the new ring, so the images a restarted assembler makes are written, not counted lost.

Every event carries the writer's ``instance`` (new for each start), so the agent sees a restarted
writer. A small journal (``<ipc dir>/std-daq-<detector>-h5_writer.journal``) names the open file; a
writer that starts and finds it (its predecessor died) repairs that file with ``layout.recover_file``
(status ``interrupted``, ``end_reason`` "writer died: ...") and answers the agent's ``STOP`` for that
request with the recovered file's counts.

A full disk (ENOSPC while writing or flushing) ends the file with status ``failed: no space left on
device``; it keeps every row flushed before the error and opens like any other file (see
``layout``). Any file the writer could not close properly is repaired with ``recover_file`` at once.

The h5 writer is the process that opens files, so it enforces the output roots itself
(``output_roots``, ``--output-root``; see :mod:`daq_backend.writer.roots`), whatever the agent
checked: the file's folder is opened from its root with ``O_NOFOLLOW`` and the file is created in
that folder (``ImageFile.create(dir_fd=...)``); ``overwrite`` replaces only a file this DAQ wrote.
A journal naming a file outside the roots is not followed.

With ``n_writers`` > 1 the detector runs several h5 writers, each given its ``writer_index`` K
(``--writer-index K``): it serves the store stream and status socket of writer K, keeps its own
journal (``...-h5_writer-K.journal``), tags its events with ``writer`` K and writes the part files the
agent sends it, like any other file. A ``STOP`` saying that another writer died closes its part as
``interrupted``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig, load_config
from daq_backend.formats import StoreOp, StoreStream
from daq_backend.messages import EndReason, images_of
from daq_backend.ram_buffer import AttachedRing, RingBuffer, SlotOverwritten
from daq_backend.stats import Counters, StatsReporter, service_name
from daq_backend.writer import layout, roots
from daq_backend.writer.layout import (
    FILE_COMPLETED,
    FILE_INTERRUPTED,
    FILE_NO_SPACE,
    ImageFile,
    is_no_space,
    recover_file,
)
from daq_backend.writer.request import parse_write_request

log = logging.getLogger(__name__)

EVENT_ALIVE = "alive"
EVENT_STARTED = "started"
EVENT_PROGRESS = "progress"
EVENT_FINISHED = "finished"

#: ``StoreStream.reason`` values the agent sends with ``STOP`` (anything else means failure).
REASON_COMPLETED = "completed"
REASON_KILLED = "killed"
#: ``STOP`` of an open-ended request whose acquisition is over: the file is complete with what it has
REASON_FINISHED = "finished"
REASON_TIMEOUT_PREFIX = "timeout:"


def journal_path(detector_name: str, writer_index: int | None = None) -> Path:
    """Where h5 writer ``writer_index`` (None: the only one) names the file it has open."""
    which = "" if writer_index is None else f"-{writer_index}"
    return Path(ipc.ipc_dir()) / f"std-daq-{detector_name}-h5_writer{which}.journal"


@dataclass
class WriterStats(Counters):
    files: int = 0
    files_failed: int = 0
    images: int = 0
    bytes: int = 0
    images_lost: int = 0
    images_incomplete: int = 0
    dropped_messages: int = 0
    bad_messages: int = 0
    ring_reattachments: int = 0
    files_no_space: int = 0
    files_recovered: int = 0


@dataclass
class _Run:
    """The file being written and what the agent knows it by."""

    request_id: str
    run_id: int
    output_file: str
    n_images: int
    file: ImageFile
    n_lost: int = 0
    n_incomplete: int = 0
    ring: RingBuffer | None = None
    last_progress: float = field(default_factory=time.monotonic)
    reported: int = -1


class H5Writer:
    """Writes the runs announced on the store stream. ``run()`` blocks; ``start()`` runs it in a thread."""

    def __init__(
        self,
        config: DetectorConfig,
        *,
        store_address: str | None = None,
        status_address: str | None = None,
        flush_interval: float = 0.1,
        idle_flush_gap: float = 0.005,
        progress_interval: float = 0.2,
        heartbeat_interval: float = 0.5,
        ring_attach_timeout: float = 5.0,
        output_roots: list[Path] | None = None,
        writer_index: int | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        #: this writer's index among the detector's ``n_writers`` (None: the only one); it selects the
        #: store stream, status socket and journal (``ipc.writer_indices``)
        self.writer_index = writer_index
        #: folders files may be created in (None: those in force, see ``roots.output_roots``)
        self.output_roots = roots.output_roots(output_roots)
        name = config.detector_name
        self.store_address = store_address or ipc.writer_agent_address(name, writer_index)
        self.status_address = status_address or ipc.writer_status_address(name, writer_index)
        self.flush_interval = flush_interval
        #: An idle writer makes new rows visible at once, but not more often than this: a flush costs
        #: ~0.2 ms, so at 1 kHz flushing after every image would double the writer's CPU per image.
        self.idle_flush_gap = idle_flush_gap
        self.progress_interval = progress_interval
        self.heartbeat_interval = heartbeat_interval
        self.ring_attach_timeout = ring_attach_timeout
        self._attached = AttachedRing(ipc.image_ring_name(config.detector_name))
        self.stats = WriterStats()
        self.journal = journal_path(name, writer_index)
        self._ctx = context or zmq.Context.instance()
        self._nbytes = config.image_nbytes
        self._dtype = np.dtype(config.image_dtype)
        self._run: _Run | None = None
        self._finished: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pub: zmq.Socket | None = None
        self._last_flush = time.monotonic()
        self._last_alive = 0.0
        #: new for every writer: the agent tells a restarted writer by it
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # -- lifetime ---------------------------------------------------------------------------------
    def start(self) -> H5Writer:
        """Run in a background thread; returns once the sockets are bound."""
        self._thread = threading.Thread(target=self.run, name=f"h5-writer-{self.config.detector_name}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; an open file is closed as ``interrupted``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 0)
        pull.setsockopt(zmq.LINGER, 0)
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 500)
        default_name = "h5_writer" if self.writer_index is None else f"h5_writer-{self.writer_index}"
        reporter = StatsReporter(self.config.detector_name, service_name(default_name), self.stats.snapshot,
                                 context=self._ctx)
        try:
            pub.bind(self.status_address)
        except zmq.ZMQError as exc:
            pull.close()
            pub.close()
            reporter.close()
            self._error = RuntimeError(f"h5 writer of {self.config.detector_name}: cannot bind "
                                       f"{self.status_address} ({exc}); is another h5 writer running?")
            self._ready.set()
            raise self._error from None
        try:
            pull.connect(self.store_address)
            self._pub = pub
            self._recover_journal()
        except BaseException as exc:
            pull.close()
            pub.close()
            ipc.unlink_ipc(self.status_address)
            reporter.close()
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        log.info("h5 writer of %s: store stream %s, status %s", self.config.detector_name,
                 self.store_address, self.status_address)
        try:
            while not self._stop.is_set():
                self._timers()
                reporter.tick()
                if not pull.poll(self._poll_ms()):
                    self._idle_flush()
                    if self._attached.ring is None:  # map the image ring before a run needs it
                        self._attached.get()
                    continue
                for _ in range(64):  # then give the timers a turn
                    try:
                        raw = pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._handle(raw)
                    except Exception as exc:  # a bug must not take the writer down: end the file
                        log.exception("h5 writer: internal error")
                        if self._run is not None:
                            self._fail(exc, "internal error")
                if self._run is not None and not pull.poll(0):
                    self._idle_flush()
        finally:
            if self._run is not None:
                self._finish(FILE_INTERRUPTED, f"{EndReason.SHUTDOWN.value}: the h5 writer was stopped")
            self._pub = None
            pull.close()
            pub.close()
            ipc.unlink_ipc(self.status_address)
            reporter.close()
            self._attached.close()

    # -- events -----------------------------------------------------------------------------------
    def _emit(self, event: str, run: _Run | None = None, **extra: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"event": event, "time": time.time(), "instance": self.instance,
                                   "writer": self.writer_index}
        if run is not None:
            message.update({
                "request_id": run.request_id, "run_id": run.run_id, "output_file": run.output_file,
                "n_images": run.n_images, "n_written": run.file.n_flushed,
                "n_missing_images": run.n_lost, "n_incomplete_images": run.n_incomplete,
            })
        message.update(extra)
        if self._pub is not None:
            self._pub.send(json.dumps(message).encode())
        return message

    def _timers(self) -> None:
        now = time.monotonic()
        run = self._run
        if run is not None and now - self._last_flush >= self.flush_interval:
            self._flush()
        if run is not None and run.reported != run.file.n_flushed and now - run.last_progress >= \
                self.progress_interval:
            run.last_progress, run.reported = now, run.file.n_flushed
            self._emit(EVENT_PROGRESS, run)
        if now - self._last_alive >= self.heartbeat_interval:
            self._last_alive = now
            self._emit(EVENT_ALIVE, writing=run.request_id if run else None)

    def _idle_flush(self) -> None:
        """Nothing queued: make the rows written so far visible (rate limited by ``idle_flush_gap``)."""
        run = self._run
        if run is not None and run.file.n_written > run.file.n_flushed and \
                time.monotonic() - self._last_flush >= self.idle_flush_gap:
            self._flush()

    def _poll_ms(self) -> int:
        waits = [self._last_alive + self.heartbeat_interval]
        if self._run is not None:
            waits.append(self._last_flush + self.flush_interval)
            if self._run.file.n_written > self._run.file.n_flushed:
                waits.append(self._last_flush + self.idle_flush_gap)
            waits.append(self._run.last_progress + self.progress_interval)
        return max(0, min(200, int((min(waits) - time.monotonic()) * 1000) + 1))

    # -- store stream -----------------------------------------------------------------------------
    def _handle(self, raw: bytes) -> None:
        try:
            msg = StoreStream.from_json(raw)
            op = StoreOp(msg.op)
        except (ValueError, TypeError, KeyError) as exc:
            self.stats.bad_messages += 1
            log.warning("h5 writer: ignoring a malformed store stream message (%s)", exc)
            return
        if op is StoreOp.START:
            self._start(msg)
        elif op is StoreOp.WRITE:
            run = self._run
            if run is None or run.request_id != msg.request_id:
                self.stats.dropped_messages += 1
                return
            try:
                self._write(run, msg)
            except Exception as exc:  # disk full, bad metadata ...: end this file, keep serving
                log.exception("h5 writer: writing %s failed", run.output_file)
                self._fail(exc)
        else:
            self._stop_run(msg)

    def _start(self, msg: StoreStream) -> None:
        if self._run is not None:
            self._finish(FILE_INTERRUPTED, f"superseded by request {msg.request_id}")
        try:
            body = msg.request or {"output_file": msg.output_file, "n_images": msg.n_images}
            request = parse_write_request(body, output_roots=self.output_roots, check_filesystem=False)
            folder = roots.open_folder(Path(request.output_file).parent, self.output_roots)
            try:
                file = ImageFile.create(
                    request.output_file, self.config, n_images=request.n_images, metadata=request.metadata,
                    compression=request.compression, overwrite=request.overwrite, request_id=msg.request_id,
                    dir_fd=folder,
                )
            finally:
                os.close(folder)
        except Exception as exc:  # any request it cannot serve is answered, never left waiting
            self.stats.files_failed += 1
            log.warning("h5 writer: cannot start %s: %s", msg.output_file, exc)
            self._remember(msg.request_id, self._emit(
                EVENT_FINISHED, request_id=msg.request_id, run_id=msg.run_id, output_file=msg.output_file,
                n_images=msg.n_images, n_written=0, n_missing_images=0, n_incomplete_images=0,
                status=f"failed: {exc}", message=str(exc),
            ))
            return
        self._run = _Run(msg.request_id, msg.run_id, request.output_file, request.n_images, file)
        self.stats.files += 1
        self._last_flush = time.monotonic()
        entry = {"output_file": request.output_file, "request_id": msg.request_id, "run_id": msg.run_id,
                 "n_images": request.n_images}
        self.journal.write_text(json.dumps(entry))
        log.info("h5 writer: writing %d images to %s", request.n_images, request.output_file)
        self._emit(EVENT_STARTED, self._run)

    def _ring(self, run: _Run) -> RingBuffer:
        if run.ring is None:
            # Checked once per run: a restarted readout re-creates the ring (new inode) and an old
            # mapping would be stale. Otherwise the mapping is kept across runs: attaching maps the
            # whole ring's page tables up front (ram_buffer._populate), worth paying once, not per file.
            self._attached.refreshed()
            ring = self._attached.get(timeout=self.ring_attach_timeout)
            if ring is None:
                raise FileNotFoundError(f"image ring /dev/shm/{self._attached.name} does not exist (is the "
                                        "readout running?)")
            run.ring = ring
            if run.ring.slot_nbytes < self._nbytes:
                raise RuntimeError(f"image ring {run.ring.name} has {run.ring.slot_nbytes}-byte slots, "
                                   f"images of this detector need {self._nbytes}")
        return run.ring

    def _write(self, run: _Run, msg: StoreStream) -> None:
        meta = msg.image_metadata
        if meta.shape != self.config.image_shape or meta.numpy_dtype != self._dtype:
            raise ValueError(
                f"image {meta.id} is {meta.height}x{meta.width} {meta.numpy_dtype}, the file holds "
                f"{self.config.image_shape[0]}x{self.config.image_shape[1]} {self._dtype}"
            )
        ring = self._ring(run)
        if not ring.holds(meta.id) and self._attached.refreshed():
            # the producer re-created the ring (an assembler restart): the id is in the new one
            new = self._attached.ring
            assert new is not None
            ring = run.ring = new
            self.stats.ring_reattachments += 1
            log.warning("h5 writer: image ring %s was re-created; following the new one", ring.name)
        file = run.file
        chunk: Any = None
        try:
            chunk = file.encode(ring.view(meta.id)[: self._nbytes])
            if file.compression != "none":
                ring.check(meta.id)  # compressed copy is ours now: verify before it reaches the file
        except SlotOverwritten as exc:
            chunk = None
            log.warning("h5 writer: %s; row %d of %s is lost", exc, file.n_written, run.output_file)
        index = file.append(meta.id, meta.status, meta.n_missing_packets, chunk)
        if chunk is not None and file.compression == "none":
            try:
                ring.check(meta.id)  # raw chunk went straight from the slot: was it torn meanwhile?
            except SlotOverwritten as exc:
                chunk = None
                file.mark_lost(index)
                log.warning("h5 writer: %s during the write; row %d of %s is lost", exc, index,
                            run.output_file)
        if chunk is None:
            run.n_lost += 1
            self.stats.images_lost += 1
        elif meta.status:
            run.n_incomplete += 1
            self.stats.images_incomplete += 1
        self.stats.images += 1
        self.stats.bytes += self._nbytes

    def _stop_run(self, msg: StoreStream) -> None:
        run = self._run
        if run is not None and run.request_id == msg.request_id:
            reason = msg.reason or REASON_COMPLETED
            if reason == REASON_COMPLETED and run.file.n_written == run.n_images:
                self._finish(FILE_COMPLETED, "")
            elif reason == REASON_COMPLETED:
                self._finish(FILE_INTERRUPTED, f"stopped after {images_of(run.file.n_written, run.n_images)}")
            elif reason == REASON_KILLED:
                self._finish(FILE_INTERRUPTED, "killed by request")
            elif reason == REASON_FINISHED:
                n = run.file.n_written
                run.n_images = n
                run.file.h5.attrs["n_images"] = np.uint64(n)  # the file asked for what it holds
                self._finish(FILE_COMPLETED, f"finished on request after {n} images")
            elif reason.startswith(REASON_TIMEOUT_PREFIX):
                self._finish(FILE_INTERRUPTED, reason.removeprefix(REASON_TIMEOUT_PREFIX).strip())
            elif reason.startswith((EndReason.AGENT_DIED.value, EndReason.SHUTDOWN.value,
                                    EndReason.WRITER_DIED.value)):  # another part's writer died
                self._finish(FILE_INTERRUPTED, reason)
            else:
                self._finish(f"failed: {reason}", reason)
            return
        previous = self._finished.get(msg.request_id)
        if previous is not None:
            if self._pub is not None:
                self._pub.send(json.dumps(previous).encode())
            return
        why = f"the h5 writer has no file open for request {msg.request_id} (was it restarted?)"
        self._emit(EVENT_FINISHED, request_id=msg.request_id, run_id=msg.run_id, output_file=msg.output_file,
                   n_images=msg.n_images, n_written=0, n_missing_images=0, n_incomplete_images=0,
                   status=f"failed: {why}", message=why)

    # -- file end ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        run = self._run
        if run is None:
            return
        try:
            run.file.flush()
        except Exception as exc:
            log.exception("h5 writer: flushing %s failed", run.output_file)
            self._fail(exc)

    def _fail(self, exc: BaseException, what: str = "") -> None:
        """End the open file after ``exc``: a full disk as ``failed: no space left on device``."""
        run = self._run
        if run is None:
            return
        if is_no_space(exc):
            self.stats.files_no_space += 1
            run.file.release_reserve()  # room for the library to close the file
            self._finish(FILE_NO_SPACE, f"{EndReason.NO_SPACE.value} on device after {run.file.n_written} of "
                         f"{run.n_images} images")
            return
        text = f"{what}: {exc}" if what else str(exc)
        self._finish(f"failed: {text}", text)

    def _finish(self, status: str, reason: str) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.file.close(status, reason)
        except Exception as exc:
            log.exception("h5 writer: closing %s failed", run.output_file)
            if not status.startswith("failed"):
                status = FILE_NO_SPACE if is_no_space(exc) else f"failed: {exc}"
                reason = f"{EndReason.NO_SPACE.value} on device" if is_no_space(exc) else str(exc)
        if not layout.openable(run.output_file):  # never leave a file that cannot be opened
            try:
                recover_file(run.output_file, reason, status)
                self.stats.files_recovered += 1
            except Exception:
                log.exception("h5 writer: repairing %s failed", run.output_file)
        self.journal.unlink(missing_ok=True)
        if status.startswith("failed"):
            self.stats.files_failed += 1
        log.info("h5 writer: %s closed (%s, %d of %d images)", run.output_file, status, run.file.n_flushed,
                 run.n_images)
        self._remember(run.request_id, self._emit(EVENT_FINISHED, run, status=status, message=reason))

    def _remember(self, request_id: str, event: dict[str, Any]) -> None:
        self._finished[request_id] = event
        while len(self._finished) > 100:
            self._finished.pop(next(iter(self._finished)))

    def _recover_journal(self) -> None:
        try:
            entry = json.loads(self.journal.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("h5 writer: unreadable journal %s (%s); removing it", self.journal, exc)
            self.journal.unlink(missing_ok=True)
            return
        path = str(entry.get("output_file", ""))
        request_id = str(entry.get("request_id", ""))
        counts = {"n_written": 0, "n_lost": 0, "n_incomplete": 0}
        reason = f"{EndReason.WRITER_DIED.value}: the previous h5 writer process died while writing the file"
        try:
            roots.confine(str(path), self.output_roots, create_default=False)
            n = recover_file(path, reason)
            with h5py.File(path, "r") as h5:
                counts = layout.file_accounting(h5)
            self.stats.files_recovered += 1
            log.warning("h5 writer: recovered %s left open by a writer that died (%d images)", path, n)
            status = FILE_INTERRUPTED
            message = f"{reason}; the file was recovered with {n} images"
        except Exception as exc:
            log.warning("h5 writer: could not recover %s (%s)", path, exc)
            status = f"failed: {reason}; the file could not be recovered: {exc}"
            message = status.removeprefix("failed: ")
        self.journal.unlink(missing_ok=True)
        if request_id:  # the agent's STOP for that request gets this answer
            self._remember(request_id, self._emit(
                EVENT_FINISHED, request_id=request_id, run_id=entry.get("run_id", 0), output_file=path,
                n_images=entry.get("n_images"), n_written=counts["n_written"],
                n_missing_images=counts["n_lost"], n_incomplete_images=counts["n_incomplete"],
                status=status, message=message, recovered=True,
            ))


# -- process entry point ------------------------------------------------------------------------------


def h5_writer_main(argv: list[str] | None = None) -> int:
    """``std-daq h5-writer CONFIG``: the h5 writer as its own process (seed's std_h5_writer)."""
    parser = argparse.ArgumentParser(prog="std-daq h5-writer", description=h5_writer_main.__doc__)
    parser.add_argument("config", help="detector JSON file")
    parser.add_argument("--writer-index", "--writer_index", type=int, default=None,
                        help="this writer's index K of the config's n_writers (> 1): it serves the store "
                        "stream and status socket of writer K and writes the part files K")
    roots.add_output_root_option(parser)
    parser.add_argument("--log_level", "--log-level", default=os.environ.get("LOG_LEVEL", "INFO"),
                        choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(args.config)
    index = args.writer_index
    if index is None and config.n_writers > 1 or index is not None and not 0 <= index < config.n_writers:
        parser.error(f"--writer-index: expected 0..{config.n_writers - 1} for n_writers {config.n_writers}"
                     if config.n_writers > 1 else "--writer-index: the config has n_writers 1")
    writer = H5Writer(config, output_roots=args.output_roots, writer_index=index)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: writer.stop())
    writer.run()
    return 0




if __name__ == "__main__":
    sys.exit(h5_writer_main())
