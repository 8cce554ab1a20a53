"""The writer agent: broker requests in, the StoreStream that drives the h5 writer out.

A ``BrokerService`` on the detector's tag. One request at a time:

1. validate (``request.parse_write_request``, with the output roots: a bad request or a file outside
   the roots is a ``request_fail`` naming the field, the roots and the option that allows others);
2. ``START`` to the h5 writer, which creates the file and answers ``started`` (or ``finished`` /
   failed, e.g. the folder vanished);
3. forward the next ``n_images`` images of the image stream as ``WRITE`` messages — or, with
   ``start_id``, the images from that id on: first those still in the image ring, then live ones;
4. ``STOP`` (completed, killed, timed out) and wait for the writer's ``finished``.

Progress (``{"n_written", "n_images", "output_file", "n_missing_images", "n_incomplete_images"}``,
rows flushed to the file and the bad ones among them) is published while writing. Nothing here
waits a fixed time for an acquisition (weakness 2): the request ends when its images are written,
when it is killed, or after its own ``timeout`` without a new image. The only fixed limit is
``writer_timeout``: how long the h5 writer may be silent (it sends heartbeats twice a second)
before it is declared dead. A killed request ends with ``request_fail`` "Interrupted: ..."
(weakness 3: a kill is not a success) after the file was closed cleanly; a kill that asks to
*finish* (``{"finish": true}``: an open-ended acquisition is over) ends it as a success, the file
*completed* with the images it has.

The image stream is read all the time by a pump thread (the SUB socket stays subscribed, so there
is no slow-joiner gap at request start); images reach a request only while it is active.

Process deaths end every request they touch within ``messages.FAULT_BOUND``:

* the h5 writer dies: its connection to the store stream drops (seen at once through a socket
  monitor; a new writer ``instance`` in its events, or silence for ``writer_timeout``, are seen
  too). The request stops forwarding, waits up to ``recovery_wait`` s for the restarted writer to
  recover the file (it answers ``STOP`` with the recovered file's counts), else reads the file's
  counter itself, and ends with ``request_fail`` "writer died: ..." whose last progress has the
  file's counts;
* the writer agent dies: the request it served is named in a journal
  (``<ipc dir>/std-daq-<detector>-writer_agent.journal``); the agent that starts next stops that
  file (``interrupted``, ``end_reason`` "writer agent died: ...") before it serves anything, and
  reports the request as failed with the file's counts.

A request whose images need more space than the output folder has free is started with a warning
(log, progress messages, result): the write ends as ``failed: no space left on device`` when the
disk fills up.

With ``n_writers`` N > 1 the agent has one store stream and one status socket per h5 writer
(``ipc.writer_agent_address(name, k)``) and splits each request (:mod:`daq_backend.writer.master`):
it checks the master's and the parts' names against the output roots and the overwrite rule,
creates the master file at ``output_file`` (in the folder opened inside its root), sends every
writer the ``START`` of its part (``<name>_part<k>.h5`` beside the master, the request's metadata,
its share of the rows), then row r's ``WRITE`` to writer r % N (rows are the request's positions: a
lost image keeps its row), and ``STOP`` to all. ``n_written`` is :func:`master.leading_rows` of the
writers' flushed rows. When every part is closed, the master is finished: ``completed`` only if
every part is, else the worst part's status, ``end_reason`` naming that part; its ``n_written``
and the request's counts are then read from the master. A writer that dies ends the request as
above (the other parts closed ``interrupted``, the dead one's part recovered by its restarted
process), the master finished with the leading complete rows; a dead agent's successor stops every
part and finishes the master. With N = 1 none of this happens: one file, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from daq_backend import ipc
from daq_backend.broker import BrokerService, RequestContext, Transport, make_transport
from daq_backend.broker.protocol import Action
from daq_backend.config import DetectorConfig, load_config
from daq_backend.formats import DTYPE_CODES, ImageMetadata, StoreOp, StoreStream
from daq_backend.messages import FAULT_BOUND, EndReason, images_of
from daq_backend.ram_buffer import RingBuffer, SlotOverwritten
from daq_backend.stats import Counters, StatsReporter
from daq_backend.stats import service_name as reported_name
from daq_backend.writer import layout, master, roots
from daq_backend.writer.h5_writer import (
    EVENT_FINISHED,
    EVENT_PROGRESS,
    EVENT_STARTED,
    REASON_COMPLETED,
    REASON_FINISHED,
    REASON_KILLED,
    REASON_TIMEOUT_PREFIX,
    H5Writer,
)
from daq_backend.writer.layout import FILE_COMPLETED, FILE_INTERRUPTED
from daq_backend.writer.request import (
    WRITER_AGENT_SERVICE,
    WriteRequest,
    parse_write_request,
    writer_services,
)

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = WRITER_AGENT_SERVICE


class WriteInterrupted(RuntimeError):
    """The request was killed (or timed out); the file is valid and holds what was written."""


class WriterFailed(RuntimeError):
    """The h5 writer could not create or finish the file."""


class WriterDied(WriterFailed):
    """The h5 writer process went away during the request (``channel``: which of the agent's
    writers, by position; None: not known)."""

    def __init__(self, message: str, channel: int | None = None) -> None:
        super().__init__(message)
        self.channel = channel


@dataclass
class _Channel:
    """The agent's end of one h5 writer: the store stream it PUSHes to, the status it SUBscribes
    to, and what it knows of the writer. ``position``: 0..N-1 (the writer of rows ``position::N``);
    ``index``: the writer's ``--writer-index`` (None: the only writer)."""

    position: int
    index: int | None
    store_address: str
    status_address: str
    push: zmq.Socket | None = None
    monitor: zmq.Socket | None = None
    #: connections to the store stream now, and how many went away so far
    peers: int = 0
    disconnects: int = 0
    last_seen: float | None = None
    #: the ``instance`` of the writer whose events came last
    instance: str | None = None

    @property
    def name(self) -> str:
        return "the h5 writer" if self.index is None else f"h5 writer {self.index}"


def journal_path(detector_name: str) -> Path:
    """Where the agent names the request it serves (read by the next agent if this one dies)."""
    return Path(ipc.ipc_dir()) / f"std-daq-{detector_name}-writer_agent.journal"


def space_warning(request: WriteRequest, config: DetectorConfig) -> str | None:
    """A warning when the output folder has less free space than the request's images need."""
    folder = Path(request.output_file).parent
    try:
        free = layout.free_bytes(folder)
    except OSError:
        return None
    need = request.n_images * config.image_nbytes + layout.RESERVE_BYTES
    if request.compression != "none" or free >= need:  # compressed sizes are not known before
        return None
    return (f"only {free / 2**20:.1f} MiB free in {folder}, {request.n_images} images need up to "
            f"{need / 2**20:.1f} MiB: the write fails with 'no space left on device' when the disk is full")


@dataclass
class AgentCounters(Counters):
    """What ``std-daq status`` shows of the writer agent (its first report also says it serves)."""

    requests: int = 0


class WriterAgent:
    """Serves write requests for one detector on ``tag`` (default: the detector name)."""

    def __init__(
        self,
        config: DetectorConfig,
        transport: Transport,
        service_name: str = DEFAULT_SERVICE_NAME,
        tag: str | None = None,
        *,
        output_roots: list[Path] | None = None,
        writer_timeout: float = 30.0,
        progress_interval: float = 0.2,
        recovery_wait: float = 0.6 * FAULT_BOUND,
        host_wait: float = FAULT_BOUND,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        #: a detector split over readout hosts: this host's share (None: one host has it all)
        self.readout_host = config.readout_host
        #: the readout hosts in order; the first one's agent writes the master file
        self.hosts = list(config.host_regions)
        self.writes_master = self.readout_host is None or self.hosts[0] == self.readout_host
        if self.readout_host is not None and service_name == DEFAULT_SERVICE_NAME:
            # each host's own status source, as the REST API expects them (``writer_services``)
            service_name = writer_services(self.hosts)[self.hosts.index(self.readout_host)]
        self.service_name = service_name
        #: seconds the master's agent waits, after its own parts closed, for the other hosts' parts
        self.host_wait = host_wait
        self.tag = tag or config.detector_name
        #: folders files may be written in (None: those in force, see ``roots.output_roots``)
        self.output_roots = roots.output_roots(output_roots)
        self.writer_timeout = writer_timeout
        self.progress_interval = progress_interval
        #: seconds a request whose h5 writer died waits for the restarted writer to recover the file
        self.recovery_wait = recovery_wait
        self.journal = journal_path(config.detector_name)
        name = config.detector_name
        self._ctx = context or zmq.Context.instance()
        self._image_address = ipc.image_metadata_address(name)
        #: one per h5 writer (``n_writers``); writer k of N writes the request's rows k, k+N, ...
        self._channels = [
            _Channel(k, index, ipc.writer_agent_address(name, index), ipc.writer_status_address(name, index))
            for k, index in enumerate(ipc.writer_indices(config.n_writers))
        ]
        self.n_writers = len(self._channels)
        self._push_lock = threading.Lock()
        self._pushing = False
        self._lock = threading.Lock()
        self._sink: queue.Queue[tuple[str, Any]] | None = None
        self._sink_request: str | None = None
        self._sink_images = False
        #: the request whose live images the pump thread forwards itself (see _Request._go_direct)
        self._direct: _Request | None = None
        self._writer_seen = threading.Condition()
        self._stop = threading.Event()
        #: set when ``stop`` begins: a running request ends as shut down, nobody waits for a new writer
        self._stopping = threading.Event()
        #: the request being served, and set while none is
        self._serving: _Request | None = None
        self._idle = threading.Event()
        self._idle.set()
        #: seconds ``stop`` gives a running request to close its file before stopping the service
        self.stop_grace = 3.0
        self._pump_ready = threading.Event()
        self._pump: threading.Thread | None = None
        self._run_ids = itertools.count(1)
        self.counters = AgentCounters()
        self._reporter: StatsReporter | None = None
        # one file at a time: a request arriving while one runs is refused ("busy: ..."), never queued
        self.service = BrokerService(transport, service_name, self.tag, self.handle, reject_when_busy=True)

    # -- lifetime ---------------------------------------------------------------------------------
    def start(self) -> WriterAgent:
        for channel in self._channels:
            push = self._ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, max(100_000, 10 * self.config.image_ring_slots))
            push.setsockopt(zmq.SNDTIMEO, int(self.writer_timeout * 1000))
            push.setsockopt(zmq.LINGER, 0)
            # before the bind: a writer that connects at once is counted too
            channel.monitor = push.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            try:
                push.bind(channel.store_address)
            except zmq.ZMQError as exc:
                channel.monitor.close()
                channel.monitor = None
                push.close()
                self._close_pushes()
                raise RuntimeError(f"writer agent of {self.config.detector_name}: cannot bind "
                                   f"{channel.store_address} ({exc}); is another agent running?") from None
            channel.push = push
        self._pushing = True
        self._stop.clear()
        self._stopping.clear()
        self._pump = threading.Thread(target=self._pump_loop, name=f"writer-agent-pump-{self.tag}",
                                      daemon=True)
        self._pump.start()
        self._pump_ready.wait()
        self._end_orphan()  # before serving: the request a dead predecessor left is ended first
        self.service.start()
        self._reporter = StatsReporter(self.config.detector_name, reported_name(DEFAULT_SERVICE_NAME),
                                       self.counters.snapshot, context=self._ctx).start()
        self._reporter.send()  # at once: the supervisor knows the agent serves
        return self

    def stop(self) -> None:
        """Stop serving; a running request is ended first (its file closed as ``interrupted``,
        ``end_reason`` "shutdown: ...")."""
        self._stopping.set()
        run = self._serving
        if run is not None:  # end the file first: stopping the broker service may wait on the broker
            run.ctx.killed.set()
            self._idle.wait(self.stop_grace)
        # Stopped on purpose: the next agent has no request of ours to end (with a dead broker the
        # request thread may still wait to report; the h5 writer closes or recovers the file itself).
        self.journal.unlink(missing_ok=True)
        if self._reporter is not None:
            self._reporter.close()
            self._reporter = None
        self.service.stop()
        self._stop.set()
        if self._pump is not None:
            self._pump.join(10)
        self._close_pushes()

    def _close_pushes(self) -> None:
        with self._push_lock:
            self._pushing = False
            for channel in self._channels:
                if channel.push is not None:
                    channel.push.close()
                    channel.push = None
                    ipc.unlink_ipc(channel.store_address)
                if channel.monitor is not None and (self._pump is None or not self._pump.is_alive()):
                    channel.monitor.close()
                    channel.monitor = None

    def __enter__(self) -> WriterAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the pump: image stream and writer status -------------------------------------------------
    def _pump_loop(self) -> None:
        images = self._ctx.socket(zmq.SUB)
        images.setsockopt(zmq.RCVHWM, max(100_000, 10 * self.config.image_ring_slots))
        images.setsockopt(zmq.LINGER, 0)
        images.setsockopt(zmq.SUBSCRIBE, b"")
        images.connect(self._image_address)
        poller = zmq.Poller()
        poller.register(images, zmq.POLLIN)
        statuses: list[tuple[zmq.Socket, _Channel]] = []
        monitors: list[tuple[zmq.Socket, _Channel]] = []
        for channel in self._channels:
            status = self._ctx.socket(zmq.SUB)
            status.setsockopt(zmq.LINGER, 0)
            status.setsockopt(zmq.SUBSCRIBE, b"")
            status.connect(channel.status_address)
            poller.register(status, zmq.POLLIN)
            statuses.append((status, channel))
            if channel.monitor is not None:
                poller.register(channel.monitor, zmq.POLLIN)
                monitors.append((channel.monitor, channel))
        self._pump_ready.set()
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                for monitor, channel in monitors:
                    if monitor in ready:
                        self._on_monitor(monitor, channel)
                for status, channel in statuses:
                    if status in ready:
                        self._on_writer_status(status.recv(), channel)
                if images in ready:
                    for _ in range(1000):
                        try:
                            raw = images.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_image(raw)
        finally:
            images.close()
            for status, _ in statuses:
                status.close()
            for monitor, channel in monitors:
                monitor.close()
                channel.monitor = None

    def _on_monitor(self, monitor: zmq.Socket, channel: _Channel) -> None:
        """Connections of an h5 writer to its store stream: one going away is a writer that died."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                channel.peers += 1
                continue
            channel.peers = max(0, channel.peers - 1)
            channel.disconnects += 1
            with self._lock:
                direct, self._direct = self._direct, None
                if direct is not None and direct.error is None:
                    direct.error = direct._writer_gone("its connection to the store stream closed", channel)
                if self._sink is not None:
                    self._sink.put(("wake", None))

    def _on_image(self, raw: bytes) -> None:
        with self._lock:
            direct = self._direct
            sink = self._sink if self._sink_images else None
            if direct is None and sink is None:
                return
            try:
                meta = ImageMetadata.unpack(raw)
            except ValueError as exc:
                log.warning("writer agent: ignoring a bad image metadata message (%s)", exc)
                return
            if direct is not None:  # under the lock: ordered with _Request._go_direct
                direct.on_live_image(meta)
                return
        assert sink is not None  # no direct request: the sink takes the image
        sink.put(("image", meta))

    def _on_writer_status(self, raw: bytes, channel: _Channel) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            log.warning("writer agent: ignoring a malformed h5 writer status")
            return
        if not isinstance(event, dict):
            log.warning("writer agent: ignoring a malformed h5 writer status")
            return
        event["writer"] = channel.position  # whose event it is, for the request
        with self._writer_seen:
            channel.last_seen = time.monotonic()
            if isinstance(event.get("instance"), str):
                channel.instance = event["instance"]
            self._writer_seen.notify_all()
        with self._lock:
            sink = self._sink if event.get("request_id") == self._sink_request else None
        if sink is not None:
            sink.put(("writer", event))

    @contextlib.contextmanager
    def _active(self, request_id: str) -> Iterator[queue.Queue[tuple[str, Any]]]:
        sink: queue.Queue[tuple[str, Any]] = queue.Queue()
        with self._lock:
            self._sink, self._sink_request, self._sink_images = sink, request_id, True
        try:
            yield sink
        finally:
            with self._lock:
                self._sink, self._sink_request, self._sink_images = None, None, False
                self._direct = None

    def _stop_images(self) -> None:
        with self._lock:
            self._sink_images = False
            self._direct = None

    def _wake(self, request_id: str) -> None:
        """Wake the request thread at once (the caller holds ``_lock``)."""
        if self._sink is not None and self._sink_request == request_id:
            self._sink.put(("wake", None))

    def _writer_alive(self, channel: _Channel) -> bool:
        with self._writer_seen:
            last = channel.last_seen
        return last is not None and time.monotonic() - last < self.writer_timeout

    def _wait_for_writer(self) -> None:
        """Until every h5 writer sent a status within ``writer_timeout``."""
        deadline = time.monotonic() + self.writer_timeout
        with self._writer_seen:
            while True:
                now = time.monotonic()
                silent = [c for c in self._channels
                          if c.last_seen is None or now - c.last_seen >= self.writer_timeout]
                if not silent:
                    return
                remaining = deadline - now
                if remaining <= 0:
                    channel = silent[0]
                    raise WriterFailed(
                        f"{channel.name} of {self.config.detector_name} is not running (no status on "
                        f"{channel.status_address} for {self.writer_timeout:g} s)"
                    )
                self._writer_seen.wait(remaining)

    def _send(self, message: StoreStream, position: int = 0) -> None:
        """Send ``message`` to h5 writer ``position`` (the only one: 0)."""
        channel = self._channels[position]
        with self._push_lock:
            push = channel.push
            if push is None or not self._pushing:
                raise RuntimeError("the writer agent is stopped")
            try:
                push.send(message.to_json(), zmq.NOBLOCK)
                return
            except zmq.Again:
                # no writer connected: one that is (re)connecting gets a second, a dead one does not
                grace = int(min(1.0, self.writer_timeout) * 1000)
                if channel.monitor is not None and channel.peers == 0 and not push.poll(grace, zmq.POLLOUT):
                    raise WriterDied(f"no h5 writer of {self.config.detector_name} is connected to "
                                     f"{channel.store_address}", position) from None
            try:  # connected but its queue is full: wait for it (up to writer_timeout)
                push.send(message.to_json())
            except zmq.Again:
                raise WriterFailed(
                    f"{channel.name} of {self.config.detector_name} does not take messages on "
                    f"{channel.store_address} (waited {self.writer_timeout:g} s)"
                ) from None

    # -- one request ------------------------------------------------------------------------------
    def handle(self, ctx: RequestContext) -> dict[str, Any]:
        """``on_request`` of the broker service: write one file; returns the result message."""
        init_timestamp = time.time()
        self.counters.requests += 1
        request = parse_write_request(ctx.request, output_roots=self.output_roots,
                                      master_elsewhere=not self.writes_master)
        run = _Request(self, ctx, request, next(self._run_ids), init_timestamp)
        run.warning = space_warning(request, self.config)
        if run.warning is not None:
            log.warning("writer agent: request %s: %s", ctx.request_id, run.warning)
        self.journal.write_text(json.dumps({
            "request_id": ctx.request_id, "request": ctx.request, "routing_key": self.tag,
            "run_id": run.run_id, "output_file": request.output_file, "n_images": request.n_images,
            "n_writers": self.n_writers,
        }))
        self._serving = run
        self._idle.clear()
        try:
            return run.run()
        finally:
            self.journal.unlink(missing_ok=True)
            self._serving = None
            self._idle.set()

    def _end_orphan(self) -> None:
        """End the request a dead predecessor was serving (named in the journal): ``STOP`` its file
        (``interrupted``, "writer agent died: ...") and report it failed with the file's counts."""
        try:
            entry = json.loads(self.journal.read_text())
            request_id, request = str(entry["request_id"]), dict(entry["request"])
            output_file, n_images = str(entry["output_file"]), int(entry["n_images"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("writer agent: unreadable journal %s (%s); removing it", self.journal, exc)
            self.journal.unlink(missing_ok=True)
            return
        why = f"{EndReason.AGENT_DIED.value}: the writer agent process died during the request"
        counts: dict[str, Any] = {}
        deadline = time.monotonic() + self.recovery_wait
        split = int(entry.get("n_writers", 1)) > 1 or self.readout_host is not None
        n = self.n_writers if split else 1
        out = Path(output_file)
        files = [str(out.with_name(master.part_file_name(out, k, self.readout_host))) for k in range(n)] \
            if split else [output_file]
        with self._active(request_id) as events:
            with self._writer_seen:  # the h5 writers' first heartbeats tell they are there
                while any(c.last_seen is None for c in self._channels[:n]) and time.monotonic() < deadline:
                    self._writer_seen.wait(0.1)
            answered: set[int] = set()
            try:
                for k, file in enumerate(files):
                    self._send(StoreStream(output_file=file, run_id=int(entry.get("run_id", 0)),
                                           n_images=n_images, image_id=0, i_image=0, op=StoreOp.STOP,
                                           request_id=request_id, reason=why), k)
                while len(answered) < n and time.monotonic() < deadline:
                    try:
                        kind, item = events.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if kind == "writer" and item.get("event") == EVENT_FINISHED:
                        answered.add(int(item.get("writer", 0)))
                        counts = item
            except WriterFailed as exc:
                log.warning("writer agent: cannot stop %s left by a dead agent: %s", output_file, exc)
        if split and self.writes_master and os.path.exists(output_file):
            try:
                if self.readout_host is not None:
                    master.combine_hosts(output_file)
                master.finish_master(output_file, FILE_INTERRUPTED, why)
                found = master.master_accounting(output_file)
                counts = {"n_written": found["n_written"], "n_missing_images": found["n_lost"],
                          "n_incomplete_images": found["n_incomplete"], "status": FILE_INTERRUPTED}
            except (OSError, KeyError, ValueError) as exc:
                log.warning("writer agent: cannot finish the master file %s: %s", output_file, exc)
        elif not counts.get("n_written") and os.path.exists(output_file):
            counts = _file_counts(output_file) or counts
        n_written = int(counts.get("n_written", 0))
        progress = {"n_written": n_written, "n_images": n_images, "output_file": output_file,
                    "n_missing_images": int(counts.get("n_missing_images", 0)),
                    "n_incomplete_images": int(counts.get("n_incomplete_images", 0))}
        routing_key = str(entry.get("routing_key") or self.tag)
        self.service.report(Action.PROGRESS, request_id, routing_key, request, progress)
        self.service.report(Action.FAIL, request_id, routing_key, request,
                            f"{why}, after {images_of(n_written, n_images)}; {output_file} holds them "
                            f"({counts.get('status', 'status unknown')})")
        log.warning("writer agent: ended request %s left by a dead agent (%d of %d images in %s)", request_id,
                    n_written, n_images, output_file)
        self.journal.unlink(missing_ok=True)


def _file_counts(path: str) -> dict[str, Any] | None:
    """The complete rows of a file as progress keys (also while a dead writer left it open)."""
    try:
        with layout.open_image_file(path) as h5:
            counts = layout.file_accounting(h5)
            status = str(h5.attrs.get("status", ""))
    except (OSError, KeyError, ValueError):
        return None
    return {"n_written": counts["n_written"], "n_missing_images": counts["n_lost"],
            "n_incomplete_images": counts["n_incomplete"], "status": status}


def _part_status(path: Path) -> str:
    """The ``status`` attribute of a part file ("" while it does not exist or cannot be read)."""
    try:
        with layout.open_image_file(path) as h5:
            value = h5.attrs.get("status", "")
    except (OSError, KeyError):
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


class _Request:
    """The state of one write request while the agent serves it."""

    def __init__(self, agent: WriterAgent, ctx: RequestContext, request: WriteRequest, run_id: int,
                 init_timestamp: float) -> None:
        self.agent = agent
        self.ctx = ctx
        self.request = request
        self.run_id = run_id
        self.init_timestamp = init_timestamp
        self.n_forwarded = 0
        self.n_written = 0
        self.last_id: int | None = None
        self.n_missing = 0
        self.n_incomplete = 0
        self.last_progress = 0.0
        self.published: tuple[int, int, int] = (-1, -1, -1)
        self.finished: dict[str, Any] | None = None
        #: the master file was created (``n_writers`` > 1): it is finished however the request ends
        self.master_created = False
        self.pending: list[ImageMetadata] = []
        self.last_image = time.monotonic()
        #: set by the pump thread when forwarding failed (the writer stopped taking messages)
        self.error: WriterFailed | None = None
        #: each h5 writer serving this request (its ``instance``) and its connection losses at start
        n = agent.n_writers
        self.instances: list[str | None] = [None] * n
        self.disconnects = [c.disconnects for c in agent._channels]
        #: each part's counts (``n_writers`` > 1: part k holds rows k, k+N, ...) and final event
        self.part_written = [0] * n
        self.part_missing = [0] * n
        self.part_incomplete = [0] * n
        self.parts_finished: dict[int, dict[str, Any]] = {}
        #: free space below what the images need (see ``space_warning``)
        self.warning: str | None = None

    @property
    def split(self) -> bool:
        """The request is written as part files (of several h5 writers, or of several readout hosts)
        and a master file."""
        return self.agent.n_writers > 1 or self.agent.readout_host is not None

    def part_file(self, position: int) -> str:
        """The part file of writer ``position`` (beside the master at the requested ``output_file``)."""
        out = Path(self.request.output_file)
        return str(out.with_name(master.part_file_name(out, position, self.agent.readout_host)))

    def part_images(self, position: int) -> int:
        """The length a part is created with: its share of the request's rows; a part with no rows
        (fewer images than writers) is created for one and finished empty."""
        return max(1, master.part_share(self.request.n_images, position, self.agent.n_writers))

    def _store(self, op: StoreOp, position: int = 0, **fields: Any) -> StoreStream:
        """A store stream message for h5 writer ``position`` (about its part, when split)."""
        output_file, n_images = self.request.output_file, self.request.n_images
        i_image = fields.pop("i_image", self.n_forwarded)
        if self.split:
            output_file, n_images = self.part_file(position), self.part_images(position)
            i_image //= self.agent.n_writers
            if "request" in fields:
                fields["request"] = {**fields["request"], "output_file": output_file, "n_images": n_images}
        return StoreStream(
            output_file=output_file, run_id=self.run_id, n_images=n_images,
            image_id=fields.pop("image_id", self.request.start_id or 0),
            i_image=i_image, op=op, request_id=self.ctx.request_id, **fields,
        )

    def _send_all(self, op: StoreOp, skip: frozenset[int] | set[int] = frozenset(), **fields: Any) -> None:
        for position in range(self.agent.n_writers):
            if position not in skip:
                self.agent._send(self._store(op, position, **fields), position)

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        except BaseException as exc:
            if self.master_created:  # a master whose request failed otherwise says so too
                self._finish_master(f"failed: {exc}", str(exc))
            raise

    def _run(self) -> dict[str, Any]:
        agent, req = self.agent, self.request
        agent._wait_for_writer()
        with agent._active(self.ctx.request_id) as events:
            backlog = self._from_ring() if req.start_id is not None else []  # before any file exists
            self.instances = [c.instance for c in agent._channels]
            self.disconnects = [c.disconnects for c in agent._channels]
            try:
                if self.split:
                    self._start_split(events)
                else:
                    agent._send(self._store(StoreOp.START, request=req.to_json_dict()))
                    started = self._next_event(events, (EVENT_STARTED, EVENT_FINISHED))
                    if started["event"] == EVENT_FINISHED:
                        raise WriterFailed(str(started.get("message") or started.get("status")))
                    self.instances[0] = started.get("instance", self.instances[0])
                if self.warning is not None:
                    self._progress(force=True)
                log.info("writer agent: request %s writes %d images to %s", self.ctx.request_id,
                         req.n_images, req.output_file)
                try:
                    reason = self._forward(events, backlog)
                except WriterFailed:
                    raise
                except Exception as exc:
                    self._end(events, f"writer agent error: {exc}")
                    self._file_closed()
                    raise
                finished = self._end(events, reason)
                self._file_closed()
            except WriterDied as exc:
                raise self._writer_died(events, exc) from None
        self._progress(force=True)
        return self._result(finished, reason)

    def _start_split(self, events: queue.Queue[tuple[str, Any]]) -> None:
        """Create the master file (in the folder opened inside the output roots), then ``START`` every
        part; a part that cannot be created ends the others and the master as failed."""
        agent, req = self.agent, self.request
        n = agent.n_writers
        out = Path(req.output_file)
        folder = roots.open_folder(out.parent, agent.output_roots)
        try:
            for position in range(n):
                name = master.part_file_name(out, position, agent.readout_host)
                problem = layout.replace_problem(name, folder, req.overwrite)
                if problem:
                    raise WriterFailed(f"cannot create the part file {out.with_name(name)}: {problem}")
            if agent.writes_master:
                self._create_master(out, folder)
        except layout.FileCreateError as exc:
            raise WriterFailed(str(exc)) from None
        finally:
            os.close(folder)
        self.master_created = agent.writes_master
        self._send_all(StoreOp.START, request=req.to_json_dict())
        started: set[int] = set()
        while len(started) + len(self.parts_finished) < n:
            event = self._next_event(events, (EVENT_STARTED, EVENT_FINISHED))
            position = int(event.get("writer", 0))
            if event["event"] == EVENT_STARTED:
                started.add(position)
                self.instances[position] = event.get("instance", self.instances[position])
        if self.parts_finished:
            position, failed = next(iter(sorted(self.parts_finished.items())))
            why = f"part {self.part_file(position)}: {failed.get('message') or failed.get('status')}"
            with contextlib.suppress(WriterFailed):
                self._send_all(StoreOp.STOP, skip=set(self.parts_finished), reason=why)
            if agent.writes_master:
                master.finish_master(req.output_file, f"failed: {why}", why)
            raise WriterFailed(why)

    def _create_master(self, out: Path, folder: int) -> None:
        """The master file over every part: this host's, or with ``readout_hosts`` every host's,
        each mapped to the host's region of the full image."""
        agent, req = self.agent, self.request
        n, config = agent.n_writers, agent.config
        if agent.readout_host is None:
            parts = [master.Part(master.part_file_name(out, k), k, n) for k in range(n)]
            master.create_master(out, parts, image_shape=config.image_shape, image_dtype=config.image_dtype,
                                 n_images=req.n_images, request_id=self.ctx.request_id,
                                 overwrite=req.overwrite, dir_fd=folder)
            return
        assert config.full_image_shape is not None
        host_parts = {host: [master.Part(master.part_file_name(out, k, host), k, n, region=region)
                             for k in range(n)]
                      for host, region in config.host_regions.items()}
        master.create_master(out, [p for mine in host_parts.values() for p in mine],
                             image_shape=config.full_image_shape, image_dtype=config.image_dtype,
                             n_images=req.n_images, request_id=self.ctx.request_id,
                             status_parts=host_parts[agent.hosts[0]], overwrite=req.overwrite,
                             dir_fd=folder, host_parts=host_parts)

    def _file_closed(self) -> None:
        """The file is closed: a later death of this agent leaves nothing for the next one to end
        (done before reporting, which may wait on the broker)."""
        self.agent.journal.unlink(missing_ok=True)

    def _writer_died(self, events: queue.Queue[tuple[str, Any]], exc: WriterDied) -> WriterFailed:
        """The h5 writer died during this request: get the file's counts from the restarted writer
        (it recovers the file and answers ``STOP`` with them) or, failing that, from the file."""
        agent, req = self.agent, self.request
        agent._stop_images()
        log.warning("writer agent: request %s: %s", self.ctx.request_id, exc)
        if self.split:
            return self._part_writer_died(events, exc)
        dead = self.instances[0]
        asked: str | None = None
        finished: dict[str, Any] | None = self.finished
        # a stopping agent waits for no new writer: the DAQ is going down
        deadline = time.monotonic() + (0.5 if agent._stopping.is_set() else agent.recovery_wait)
        while finished is None and time.monotonic() < deadline:
            instance = agent._channels[0].instance
            if instance is not None and instance not in (dead, asked):
                asked = instance  # a new writer runs: it recovered the file at its start
                with contextlib.suppress(WriterFailed):
                    agent._send(self._store(StoreOp.STOP, reason=EndReason.WRITER_DIED.value))
            try:
                kind, item = events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "writer" and item.get("event") == EVENT_FINISHED:
                finished = item
        counts = finished if finished is not None and finished.get("recovered") else None
        if counts is None:
            counts = _file_counts(req.output_file) or {}
            state = (f"{req.output_file} was not recovered yet (status {counts.get('status', 'unknown')});"
                     " the next h5 writer start recovers it")
        else:
            state = f"{req.output_file} was recovered as {counts.get('status')} with its complete images"
        self.n_written = int(counts.get("n_written", self.n_written))
        self.n_missing = int(counts.get("n_missing_images", self.n_missing))
        self.n_incomplete = int(counts.get("n_incomplete_images", self.n_incomplete))
        self._file_closed()
        self._progress(force=True)
        return WriterFailed(f"{EndReason.WRITER_DIED.value}: the h5 writer died after "
                            f"{images_of(self.n_written, req.n_images)} ({exc}); {state}")

    def _part_writer_died(self, events: queue.Queue[tuple[str, Any]], exc: WriterDied) -> WriterFailed:
        """One of several h5 writers died: the others close their parts (``interrupted``, "writer
        died: ..."), the restarted writer recovers the dead one's part (its journal) and answers
        ``STOP`` with its counts; the master's ``n_written`` is then the parts' leading complete rows."""
        agent, req = self.agent, self.request
        n = agent.n_writers
        dead = exc.channel if exc.channel is not None else self._dead_channel()
        dead_name = agent._channels[dead].name if dead is not None else "an h5 writer"
        dead_part = self.part_file(dead) if dead is not None else "?"
        why = f"{EndReason.WRITER_DIED.value}: {dead_name} (part {dead_part}) died during the request"
        for position in range(n):
            if position != dead and position not in self.parts_finished:
                try:
                    agent._send(self._store(StoreOp.STOP, position, reason=why), position)
                except WriterFailed as other:
                    log.warning("writer agent: cannot stop part %s: %s", self.part_file(position), other)
        dead_instance = self.instances[dead] if dead is not None else None
        asked: str | None = None
        deadline = time.monotonic() + (0.5 if agent._stopping.is_set() else agent.recovery_wait)
        recovered = False
        while time.monotonic() < deadline:
            if dead is not None:
                instance = agent._channels[dead].instance
                if instance is not None and instance not in (dead_instance, asked):
                    asked = instance  # a new writer runs: it recovered the part at its start
                    with contextlib.suppress(WriterFailed):
                        agent._send(self._store(StoreOp.STOP, dead, reason=EndReason.WRITER_DIED.value), dead)
            if dead is not None:
                final = self.parts_finished.get(dead)
                recovered = final is not None and bool(final.get("recovered"))
            if (dead is None or recovered) and all(k in self.parts_finished for k in range(n) if k != dead):
                break
            try:
                kind, item = events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "writer" and item.get("event") == EVENT_FINISHED:
                position = int(item.get("writer", 0))
                if position == dead and not item.get("recovered"):
                    continue  # an answer of the dead writer from before it died
                self._on_writer(item)
        state = (f"{dead_part} was recovered with its complete images" if recovered else
                 f"{dead_part} was not recovered yet; the next start of {dead_name} recovers it")
        self._finish_master(FILE_INTERRUPTED, f"{why}; {state}")
        self._file_closed()
        self._progress(force=True)
        return WriterFailed(f"{why}, after {images_of(self.n_written, req.n_images)} ({exc}); "
                            f"{req.output_file} holds them; {state}")

    def _dead_channel(self) -> int | None:
        agent = self.agent
        for channel in agent._channels:
            k = channel.position
            if channel.disconnects != self.disconnects[k] or not agent._writer_alive(channel) or (
                    self.instances[k] is not None and channel.instance not in (None, self.instances[k])):
                return k
        return None

    def _finish_master(self, status: str, reason: str, n_images: int | None = None) -> tuple[str, str]:
        """Close the master: ``n_written`` and the counts of the request are then the master's. With
        ``readout_hosts``, the agent of the first host waits (``host_wait``) for the other hosts'
        parts to close, takes the worst of their statuses and combines the per-image datasets
        (``master.combine_hosts``); another host's agent has no master: its counts are its parts'."""
        if not self.agent.writes_master:
            self.master_created = False
            return status, reason
        try:
            if self.agent.readout_host is not None:
                status, reason = self._other_hosts(status, reason)
                master.combine_hosts(self.request.output_file)
            self.n_written = master.finish_master(self.request.output_file, status, reason, n_images)
            counts = master.master_accounting(self.request.output_file)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("writer agent: cannot finish the master file %s: %s", self.request.output_file, exc)
            return status, reason
        finally:
            self.master_created = False
        self.n_missing, self.n_incomplete = counts["n_lost"], counts["n_incomplete"]
        return status, reason

    def _other_hosts(self, status: str, reason: str) -> tuple[str, str]:
        """Wait until every other host's part is closed (at most ``host_wait`` s), then the worst of
        ``status`` and theirs (a part still open or missing then: ``interrupted``, the reason naming
        it)."""
        agent = self.agent
        out = Path(self.request.output_file)
        others = [out.with_name(master.part_file_name(out, k, host))
                  for host in agent.hosts if host != agent.readout_host for k in range(agent.n_writers)]
        deadline = time.monotonic() + agent.host_wait
        states: dict[Path, str] = {}
        while True:
            states = {path: _part_status(path) for path in others}
            if all(s not in ("", layout.FILE_WRITING) for s in states.values()) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.05)  # the other hosts' agents tell this one nothing: their files do
        rank = {FILE_COMPLETED: 0, FILE_INTERRUPTED: 1}
        worst_rank = rank.get(status, 2)
        for path, state in states.items():
            if state in ("", layout.FILE_WRITING):
                state, why = FILE_INTERRUPTED, (f"part {path} of another readout host "
                                                f"{'is missing' if not state else 'is still open'} "
                                                f"{agent.host_wait:g} s after this host's parts closed")
            else:
                why = f"part {path}: {state}"
            if rank.get(state, 2) > worst_rank:
                status, reason, worst_rank = state, why, rank.get(state, 2)
        return status, reason

    def _end(self, events: queue.Queue[tuple[str, Any]], reason: str) -> dict[str, Any]:
        """``STOP`` the file and wait until the writer closed it."""
        self.agent._stop_images()
        if self.split:
            return self._end_split(events, reason)
        self.agent._send(self._store(StoreOp.STOP, reason=reason))
        finished = self.finished or self._next_event(events, (EVENT_FINISHED,))
        self.n_written = int(finished.get("n_written", self.n_written))
        return finished

    def _end_split(self, events: queue.Queue[tuple[str, Any]], reason: str) -> dict[str, Any]:
        """``STOP`` every part, wait until all are closed, finish the master with the combined status:
        completed when every part is, else the worst of them, the reason naming the part."""
        agent, n = self.agent, self.agent.n_writers
        for position in range(n):
            if position in self.parts_finished:
                continue
            part_reason = reason
            if reason == REASON_COMPLETED and self.part_written[position] == 0 and \
                    master.part_share(self.request.n_images, position, n) == 0:
                part_reason = REASON_FINISHED  # fewer images than writers: this part is complete empty
            agent._send(self._store(StoreOp.STOP, position, reason=part_reason), position)
        while len(self.parts_finished) < n:
            self._next_event(events, (EVENT_FINISHED,))
        rank = {FILE_COMPLETED: 0, FILE_INTERRUPTED: 1}
        worst, worst_rank, message = FILE_COMPLETED, 0, ""
        for position in range(n):
            final = self.parts_finished[position]
            status = str(final.get("status", ""))
            r = rank.get(status, 2)
            if r > worst_rank:
                worst, worst_rank = status, r
                message = f"part {self.part_file(position)}: {final.get('message') or status}"
        n_images = self.n_forwarded if reason == REASON_FINISHED else None
        worst, message = self._finish_master(worst, message, n_images)
        return {"status": worst, "message": message, "n_written": self.n_written,
                "n_images": n_images if n_images is not None else self.request.n_images,
                "n_missing_images": self.n_missing, "n_incomplete_images": self.n_incomplete}

    # -- forwarding -------------------------------------------------------------------------------
    def _forward(self, events: queue.Queue[tuple[str, Any]], backlog: list[ImageMetadata]) -> str:
        """Send ``WRITE`` for each wanted image (``backlog`` from the ring first); returns the
        ``STOP`` reason.

        Live images are forwarded by the pump thread itself once this request "goes direct": a
        hand-off per image to this thread cost a thread wake-up and a queue round trip each (a third
        of the agent's CPU at 1 kHz). This thread keeps the control: kill, timeout, writer events."""
        req = self.request
        for meta in backlog:
            if self.n_forwarded == req.n_images or self.ctx.killed.is_set():
                break
            self._write(meta)
        self.last_image = time.monotonic()
        if self.n_forwarded < req.n_images and not self.ctx.killed.is_set():
            for kind, item in self._go_direct(events):
                if kind == "writer":
                    self._on_writer(item)
        while True:
            if self.error is not None:
                raise self.error
            if self.n_forwarded >= req.n_images:
                break
            if self.finished is not None:  # the writer gave up on this file (disk full ...)
                return str(self.finished.get("message") or self.finished.get("status"))
            if self.ctx.killed.is_set():
                return self._kill_reason()
            if req.timeout is not None and time.monotonic() - self.last_image > req.timeout:
                return (f"{REASON_TIMEOUT_PREFIX} no image arrived for {req.timeout:g} s "
                        f"after {self.n_forwarded} of {req.n_images}")
            try:
                kind, item = events.get(timeout=0.1)
            except queue.Empty:
                self._check_writer()
                self._progress()  # a change the rate limit held back goes out now
                continue
            if kind == "writer":
                self._on_writer(item)
        return self._kill_reason() if self.ctx.killed.is_set() else REASON_COMPLETED

    def _go_direct(self, events: queue.Queue[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Forward what the pump queued so far, then let it forward live images itself. Returns the
        writer events taken from the queue meanwhile (for the caller to handle, in order)."""
        others: list[tuple[str, Any]] = []
        with self.agent._lock:  # the pump cannot queue or forward while this runs: nothing reordered
            queued = [("image", meta) for meta in self.pending]
            self.pending.clear()
            while True:
                try:
                    queued.append(events.get_nowait())
                except queue.Empty:
                    break
            for kind, item in queued:
                if kind == "image":
                    self.on_live_image(item)
                else:
                    others.append((kind, item))
            if self.error is None and self.n_forwarded < self.request.n_images:
                self.agent._direct = self
        return others

    def on_live_image(self, meta: ImageMetadata) -> None:
        """One image of the live stream (the pump thread, the agent's lock held)."""
        req = self.request
        if self.error is not None or self.n_forwarded >= req.n_images or self.ctx.killed.is_set():
            return
        if req.start_id is not None and (
            meta.id < req.start_id or (self.last_id is not None and meta.id <= self.last_id)
        ):
            return
        try:
            self._write(meta)
        except WriterFailed as exc:
            self.error = exc
        self.last_image = time.monotonic()
        if self.error is not None or self.n_forwarded >= req.n_images:
            self.agent._direct = None
            self.agent._wake(self.ctx.request_id)

    def _kill_reason(self) -> str:
        """A kill that asks to finish ends the file as completed with what it has; the agent being
        stopped ends it as shut down."""
        if self.agent._stopping.is_set() and not self.ctx.finish:
            return f"{EndReason.SHUTDOWN.value}: the writer agent was stopped"
        return REASON_FINISHED if self.ctx.finish else REASON_KILLED

    def _write(self, meta: ImageMetadata) -> None:
        position = self.n_forwarded % self.agent.n_writers  # row r goes to writer r % N
        try:
            message = self._store(StoreOp.WRITE, position, image_id=meta.id, metadata=meta.pack().hex())
            self.agent._send(message, position)
        except WriterFailed as exc:
            raise exc if isinstance(exc, WriterDied) else \
                self._writer_gone(str(exc), self.agent._channels[position]) from None
        self.n_forwarded += 1
        self.last_id = meta.id

    def _from_ring(self) -> list[ImageMetadata]:
        """Images with id >= start_id still in the ring, oldest first (ids are assumed to increase)."""
        config, start = self.agent.config, self.request.start_id
        assert start is not None
        try:
            ring = RingBuffer.attach(ipc.image_ring_name(config.detector_name), timeout=0, populate=False)
        except FileNotFoundError:
            return []
        try:
            newest = ring.newest_id()
            if newest is None or start > newest:
                return []
            oldest = max(0, newest - ring.n_slots + 1)
            if start < oldest:
                raise ValueError(
                    f"start_id: image {start} is no longer in the image ring "
                    f"(it holds ids {oldest}..{newest})"
                )
            found = []
            fallback = DTYPE_CODES[config.image_dtype]
            for image_id in range(start, newest + 1):
                if not ring.holds(image_id):
                    continue
                try:
                    meta = ImageMetadata.unpack(ring.meta(image_id, ImageMetadata.FORMAT.size))
                except (SlotOverwritten, ValueError):
                    meta = None
                if meta is None or meta.id != image_id:  # a producer that keeps no metadata in the slot
                    h, w = config.image_shape
                    meta = ImageMetadata(image_id, h, w, fallback)
                found.append(meta)
            return found
        finally:
            ring.close()

    # -- writer events ----------------------------------------------------------------------------
    def _next_event(self, events: queue.Queue[tuple[str, Any]], wanted: tuple[str, ...]) -> dict[str, Any]:
        """The next ``wanted`` event of this request. The writer must show progress on it: a writer
        that is alive but silent about this request for ``writer_timeout`` lost the message."""
        last = time.monotonic()
        while True:
            try:
                kind, item = events.get(timeout=0.1)
            except queue.Empty:
                self._check_writer()
                if time.monotonic() - last > self.agent.writer_timeout:
                    raise WriterFailed(
                        f"the h5 writer did not answer about {self.request.output_file} for "
                        f"{self.agent.writer_timeout:g} s (waiting for {' or '.join(wanted)})"
                    ) from None
                continue
            if kind == "image":
                self.pending.append(item)  # arrived while waiting for the file: forwarded next
                continue
            if kind != "writer":
                continue
            last = time.monotonic()
            self._on_writer(item)
            if item.get("event") in wanted:
                return item

    def _on_writer(self, event: dict[str, Any]) -> None:
        if not self.split:
            if event.get("event") in (EVENT_PROGRESS, EVENT_STARTED, EVENT_FINISHED):
                self.n_written = int(event.get("n_written", self.n_written))
                self.n_missing = int(event.get("n_missing_images", self.n_missing))
                self.n_incomplete = int(event.get("n_incomplete_images", self.n_incomplete))
                self._progress()
            if event.get("event") == EVENT_FINISHED:
                self.finished = event
            return
        position = int(event.get("writer", 0))
        if not 0 <= position < self.agent.n_writers or position in self.parts_finished:
            return
        if event.get("event") in (EVENT_PROGRESS, EVENT_STARTED, EVENT_FINISHED):
            k = position
            self.part_written[k] = int(event.get("n_written", self.part_written[k]))
            self.part_missing[k] = int(event.get("n_missing_images", self.part_missing[k]))
            self.part_incomplete[k] = int(event.get("n_incomplete_images", self.part_incomplete[k]))
            self.n_written = master.leading_rows(self.part_written)
            self.n_missing, self.n_incomplete = sum(self.part_missing), sum(self.part_incomplete)
            self._progress()
        if event.get("event") == EVENT_FINISHED:
            self.parts_finished[position] = event
            if self.finished is None:
                self.finished = event

    def _check_writer(self) -> None:
        agent = self.agent
        if self.error is not None:
            raise self.error
        for channel in agent._channels:
            k = channel.position
            if k in self.parts_finished:
                continue
            if channel.disconnects != self.disconnects[k]:
                raise self._writer_gone("its connection to the store stream closed", channel)
            instance = channel.instance
            if self.instances[k] is not None and instance is not None and instance != self.instances[k]:
                raise self._writer_gone(f"a new h5 writer ({instance}) replaced it", channel)
            if not agent._writer_alive(channel):
                raise self._writer_gone(f"no status for {agent.writer_timeout:g} s", channel)

    def _writer_gone(self, why: str = "", channel: _Channel | None = None) -> WriterDied:
        why = why or f"no status for {self.agent.writer_timeout:g} s"
        name = channel.name if channel is not None else "the h5 writer"
        return WriterDied(f"{name} stopped responding ({why})",
                          channel.position if channel is not None else None)

    def _progress(self, force: bool = False) -> None:
        """Publish progress (rate limited; a held-back change is sent by the next call once due).
        ``n_missing_images`` (rows lost: zeros) and ``n_incomplete_images`` (missing packets, id
        mismatch) let a client see bad images while the file is written."""
        now = time.monotonic()
        due = now - self.last_progress >= self.agent.progress_interval
        current = (self.n_written, self.n_missing, self.n_incomplete)
        if not force and (current == self.published or not due):
            return
        self.last_progress, self.published = now, current
        progress: dict[str, Any] = {"n_written": self.n_written, "n_images": self.request.n_images,
                                    "output_file": self.request.output_file,
                                    "n_missing_images": self.n_missing,
                                    "n_incomplete_images": self.n_incomplete}
        if self.warning is not None:
            progress["warning"] = self.warning
        self.ctx.publish_progress(progress)

    def _result(self, finished: dict[str, Any], reason: str) -> dict[str, Any]:
        req = self.request
        status = str(finished.get("status", ""))
        where = f"file {req.output_file} is valid"
        if status.startswith("failed"):
            raise WriterFailed(f"Failed after {images_of(self.n_written, req.n_images)}: "
                               f"{finished.get('message') or status}; "
                               f"{req.output_file} holds the images written")
        if reason.startswith(EndReason.SHUTDOWN.value):
            raise WriteInterrupted(f"Interrupted: {reason} after {images_of(self.n_written, req.n_images)}; "
                                   f"{where}")
        if reason == REASON_KILLED:
            raise WriteInterrupted(
                f"Interrupted: killed after {images_of(self.n_written, req.n_images)}; {where}"
            )
        if reason.startswith(REASON_TIMEOUT_PREFIX):
            raise WriteInterrupted(f"Interrupted: {reason.removeprefix(REASON_TIMEOUT_PREFIX).strip()} "
                                   f"images; {where}")
        return {
            "output_file": req.output_file,
            "n_written": self.n_written,
            "n_images": int(finished.get("n_images", req.n_images)) if reason == REASON_FINISHED
            else req.n_images,
            "status": "completed" if status == "completed" else "interrupted",
            "n_missing_images": int(finished.get("n_missing_images", 0)),
            "n_incomplete_images": int(finished.get("n_incomplete_images", 0)),
            "init_timestamp": self.init_timestamp,
            "end_timestamp": time.time(),
            **({"warning": self.warning} if self.warning is not None else {}),
        }


# -- agent and h5 writer in one process ---------------------------------------------------------------


class DetectorWriter:
    """Writer agent + h5 writer (in a thread) in one process: the embedded default and the tests."""

    def __init__(self, config: DetectorConfig, transport: Transport, service_name: str = DEFAULT_SERVICE_NAME,
                 tag: str | None = None, *, h5_options: dict[str, Any] | None = None,
                 **agent_options: Any) -> None:
        h5_options = {"output_roots": agent_options.get("output_roots"), **(h5_options or {})}
        #: one per ``n_writers`` (``ipc.writer_indices``)
        self.h5_writers = [H5Writer(config, writer_index=index, **h5_options)
                           for index in ipc.writer_indices(config.n_writers)]
        self.h5_writer = self.h5_writers[0]
        self.agent = WriterAgent(config, transport, service_name, tag, **agent_options)

    def start(self) -> DetectorWriter:
        started: list[H5Writer] = []
        try:
            for writer in self.h5_writers:
                writer.start()
                started.append(writer)
            self.agent.start()
        except BaseException:
            for writer in started:
                writer.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.agent.stop()
        finally:
            for writer in self.h5_writers:
                writer.stop()

    def __enter__(self) -> DetectorWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- process entry point ------------------------------------------------------------------------------


def writer_agent_main(argv: list[str] | None = None) -> int:
    """``std-daq writer-agent CONFIG``: serve write requests of one detector on the broker."""
    parser = argparse.ArgumentParser(prog="std-daq writer-agent", description=writer_agent_main.__doc__)
    parser.add_argument("config", help="detector JSON file")
    parser.add_argument("--service_name", "--service-name", default=os.environ.get("SERVICE_NAME") or
                        DEFAULT_SERVICE_NAME, help="name in status messages (env SERVICE_NAME)")
    parser.add_argument("--tag", default=None, help="routing key of requests (default: the detector name)")
    parser.add_argument("--broker_url", "--broker-url", default=None,
                        help="amqp://... or embedded[://NAME] "
                        "(default: env BROKER_URL, else BROKER_HOST, else embedded)")
    parser.add_argument("--with-h5-writer", "--with_h5_writer", action="store_true",
                        help="run the h5 writer in this process too (else start `std-daq h5-writer CONFIG`)")
    parser.add_argument("--writer-timeout", "--writer_timeout", type=float, default=30.0,
                        help="seconds the h5 writer may be silent before a request fails")
    roots.add_output_root_option(parser)
    parser.add_argument("--log_level", "--log-level", default=os.environ.get("LOG_LEVEL", "INFO"),
                        choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(args.config)
    transport = make_transport(args.broker_url)
    options: dict[str, Any] = {"writer_timeout": args.writer_timeout, "output_roots": args.output_roots}
    service: DetectorWriter | WriterAgent
    if args.with_h5_writer:
        service = DetectorWriter(config, transport, args.service_name, args.tag, **options)
    else:
        service = WriterAgent(config, transport, args.service_name, args.tag, **options)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    service.start()
    try:
        done.wait()
    finally:
        service.stop()
        transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(writer_agent_main())
