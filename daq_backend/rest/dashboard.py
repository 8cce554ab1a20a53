"""The live dashboard of one detector DAQ: ``GET /ui`` in a browser, fed by one server-sent event
stream (``GET /ui/events``).

The page (``static/``: plain HTML, one JavaScript module, one stylesheet, no build step) shows the
processes and their health, rates, loss counters by process and reason, the running request with its
progress, the newest log lines and the newest image, colour-mapped, with its status.

Viewing it must never slow the data path, so the work does not grow with the number of viewers:

* one producer task per API process runs while at least one viewer is connected (none otherwise);
  every ``interval`` it reads the supervisor's status file and the request tracker once, builds a
  :class:`DashboardSnapshot` and encodes it once; every viewer is sent the same bytes, and a slow
  viewer skips snapshots instead of queueing them;
* the image is rendered at most once per ``image_interval`` and only when the ring holds a newer
  image, by a short look at the newest slot (``dashboard_image``), and released when nobody watches.

``GET /ui/snapshot`` answers the same model as JSON, for scripts and tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any, Literal

from fastapi import APIRouter, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, Field

from daq_backend import ipc
from daq_backend.logtail import parse_lines
from daq_backend.messages import RequestState
from daq_backend.rest.backend import DaqBackend
from daq_backend.rest.dashboard_image import ImageInfo, ImageRenderer
from daq_backend.rest.models import StatsResponse
from daq_backend.rest.request_tracker import DETECTOR, RequestRecord
from daq_backend.rest.stats_summary import summarize_stats

_logger = logging.getLogger(__name__)

#: seconds between snapshots, and the shortest time between two rendered images
DEFAULT_INTERVAL = 0.5
DEFAULT_IMAGE_INTERVAL = 1.0
#: newest log lines in a snapshot (all processes together)
LOG_LINES = 80
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


# -- the snapshot ---------------------------------------------------------------------------------


class CounterView(BaseModel):
    """One counter a process reports; ``kind`` says whether it counts losses or anomalies."""

    key: str = Field(description="the counter's name as the process reports it (nested: 'a.b')")
    label: str = Field(description="what it counts, in words")
    value: float
    kind: Literal["count", "loss", "anomaly"]


class ProcessView(BaseModel):
    name: str
    role: Literal["receiver", "assembler", "writer", "rest", "other"]
    state: Literal["running", "down", "stale", "unknown"]
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    uptime: float | None = Field(default=None, description="seconds since this process started")
    stats_age: float | None = Field(default=None, description="seconds since it last reported counters")
    rates: dict[str, float] = Field(default_factory=dict, description="per second: packets, frames, ...")
    counters: list[CounterView] = Field(default_factory=list)
    warnings: int = Field(default=0, description="warning lines it logged since the supervisor started")
    errors: int = Field(default=0, description="errors it logged (a traceback counts once)")


class Problem(BaseModel):
    severity: Literal["error", "warning"]
    text: str


class RequestView(BaseModel):
    """The running write request, else the most recent one."""

    request_id: str
    state: RequestState
    n_written: int
    n_images: int | None
    progress: float | None = Field(description="n_written / n_images (0..1), None if open-ended")
    output_file: str | None
    message: str | None
    n_missing_images: int
    n_incomplete_images: int
    started: float | None = Field(description="unix time the writer started it")
    elapsed: float | None = Field(description="seconds from start to end (or to now)")
    images_per_second: float | None
    eta: float | None = Field(description="seconds until n_images at the current rate")
    queued: int = Field(description="requests waiting behind this one")


class LogLineView(BaseModel):
    time: float = Field(description="unix time the supervisor read the line")
    service: str
    level: str
    text: str = Field(description="the line as the process wrote it")
    message: str = Field(description="the text without the timestamp, logger name and level it repeats")


class DashboardSnapshot(BaseModel):
    """Everything the page shows, computed once per interval for all viewers."""

    seq: int
    time: float = Field(description="unix time of this snapshot")
    interval: float
    viewers: int
    detector: str
    detector_type: str
    n_modules: int
    image_shape: tuple[int, int]
    image_dtype: str
    broker: str
    problems: list[Problem]
    stats: StatsResponse = Field(description="exactly what GET /stats answered at this moment")
    stats_age: float | None = Field(description="seconds since the supervisor refreshed the counters")
    processes: list[ProcessView]
    request: RequestView | None
    logs: list[LogLineView]
    image: ImageInfo | None
    image_error: str | None = Field(description="why there is no image, if there is none")


# -- counters -------------------------------------------------------------------------------------

#: labels of the counters the processes report today; others are shown by name
KNOWN_COUNTERS: dict[str, str] = {
    "packets": "packets received",
    "bytes": "bytes",
    "frames": "frames",
    "images": "images",
    "files": "files",
    "frames_incomplete": "frames missing packets",
    "missing_packets": "packets missing",
    "bad_datagrams": "bad datagrams",
    "duplicate_packets": "duplicate packets",
    "out_of_order_packets": "packets out of order",
    "late_packets": "late packets",
    "frames_skipped": "frames never seen",
    "images_good": "images good",
    "images_missing_packets": "images missing packets",
    "images_id_mismatch": "images id mismatch",
    "missing_module_frames": "module frames missing",
    "images_skipped": "images never seen",
    "lapped_frames": "frames overwritten",
    "duplicate_frames": "duplicate module frames",
    "late_frames": "late module frames",
    "ignored_frames": "module frames ignored",
    "files_failed": "files failed",
    "images_lost": "images lost",
    "images_incomplete": "images written incomplete",
    "dropped_messages": "messages dropped",
    "bad_messages": "malformed messages",
    "frame_rings_recreated": "frame rings re-created",
}
_LOSS_WORDS = re.compile(
    r"missing|lost|incomplete|mismatch|reject|drop|bad|torn|lapped|skipped|overwrit|evict|fail|invalid"
    r"|garbage|spoof|late|unannounced|error|oversize|truncat"
)
_ANOMALY_WORDS = re.compile(r"duplicate|out_of_order|ignored|reattach|reconnect")
_ROLES = (("receiver", "receiver"), ("assembler", "assembler"), ("stream-recv", "assembler"),
          ("rest", "rest"))


def counter_kind(key: str) -> Literal["count", "loss", "anomaly"]:
    """``loss`` for counters of data that did not arrive or was damaged, ``anomaly`` for odd but
    harmless events (duplicates, reordering), ``count`` for the rest."""
    if _ANOMALY_WORDS.search(key):
        return "anomaly"
    if _LOSS_WORDS.search(key):
        return "loss"
    return "count"


def counter_label(key: str) -> str:
    if key in KNOWN_COUNTERS:
        return KNOWN_COUNTERS[key]
    head, _, reason = key.rpartition(".")
    if head:
        return f"{counter_label(head)}: {reason.replace('_', ' ')}"
    return key.replace("_", " ")


def flatten_counters(counters: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Numeric counters, nested mappings (counters by reason) as ``outer.inner``."""
    flat: list[tuple[str, float]] = []
    for key, value in counters.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.extend(flatten_counters(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            flat.append((name, value))
    return flat


def _role(name: str) -> Literal["receiver", "assembler", "writer", "rest", "other"]:
    for prefix, role in _ROLES:
        if name.startswith(prefix):
            return role  # type: ignore[return-value]
    return "writer" if "writer" in name else "other"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one (status files are read, not trusted)."""
    return value if isinstance(value, Mapping) else {}


def process_views(status: Mapping[str, Any] | None, now: float) -> list[ProcessView]:
    if status is None:
        return []
    stale = bool(status.get("stale"))
    logs = _mapping(status.get("logs"))
    views = []
    for svc in status.get("services", []):
        if not isinstance(svc, Mapping):
            continue
        name = str(svc.get("name", "?"))
        alive = svc.get("alive")
        state: Literal["running", "down", "stale", "unknown"] = (
            "stale" if stale else "running" if alive is True else "down" if alive is False else "unknown"
        )
        counters = _mapping(svc.get("counters"))
        stamp = _number(svc.get("stats_time"))
        log = _mapping(logs.get(name))
        rates = _mapping(svc.get("rates"))
        views.append(ProcessView(
            name=name,
            role=_role(name),
            state=state,
            pid=svc.get("pid") if isinstance(svc.get("pid"), int) else None,
            restarts=int(_number(svc.get("restarts")) or 0),
            exit_code=svc.get("exit_code") if isinstance(svc.get("exit_code"), int) else None,
            uptime=_number(svc.get("uptime")) if alive else None,
            stats_age=None if stamp is None else max(0.0, now - stamp),
            rates={k: float(v) for k, v in rates.items() if _number(v) is not None},
            counters=[CounterView(key=k, label=counter_label(k), value=v, kind=counter_kind(k))
                      for k, v in flatten_counters(counters)],
            warnings=int(_number(log.get("warnings")) or 0),
            errors=int(_number(log.get("errors")) or 0),
        ))
    return views


_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?\s*")
_LOGGER_NAME = re.compile(r"^(?:__main__|[A-Za-z_]\w*(?:\.\w+)+):?\s+")


def log_message(text: str, level: str) -> str:
    """``2026-01-01 10:00:00,000 daq_backend.x INFO what happened`` -> ``what happened``."""
    head, rest = text[:60], text[60:]
    head, stamps = _TIMESTAMP.subn("", head, count=1)
    levels = 0
    if level:
        head, levels = re.subn(rf"\b{level}\b:?\s*", "", head, count=1)
    if not stamps and not levels:
        return text  # not a log record (print output, traceback): as written
    message = _LOGGER_NAME.sub("", (head + rest).lstrip(), count=1)
    return message.strip() or text


def log_views(status: Mapping[str, Any] | None, detector: str, n: int = LOG_LINES) -> list[LogLineView]:
    """The newest ``n`` lines of all processes and the supervisor, oldest first (the supervisor's
    lines without the detector name they start with)."""
    logs = status.get("logs") if status is not None else None
    if not isinstance(logs, Mapping):
        return []
    lines = [
        LogLineView(time=line.time, service=str(service), level=line.level, text=line.text,
                    message=log_message(line.text, line.level).removeprefix(f"{detector}: "))
        for service, entry in logs.items() if isinstance(entry, Mapping)
        for line in parse_lines(entry.get("lines"))
    ]
    lines.sort(key=lambda line: line.time)
    return lines[-n:]


def request_view(record: RequestRecord | None, queued: int, now: float) -> RequestView | None:
    if record is None:
        return None
    started = record.init_timestamp
    end = record.end_timestamp if record.final else None
    elapsed = None if started is None else max(0.0, (end or now) - started)
    rate = record.n_written / elapsed if elapsed and record.n_written else None
    progress = None
    if record.n_images:
        progress = min(1.0, record.n_written / record.n_images)
    eta = None
    if rate and record.n_images and not record.final:
        eta = max(0.0, (record.n_images - record.n_written) / rate)
    return RequestView(
        request_id=record.request_id, state=record.state, n_written=record.n_written,
        n_images=record.n_images, progress=progress, output_file=record.output_file,
        message=record.message, n_missing_images=record.n_missing_images,
        n_incomplete_images=record.n_incomplete_images, started=started, elapsed=elapsed,
        images_per_second=rate, eta=eta, queued=queued,
    )


def find_problems(stats: StatsResponse, stats_age: float | None, processes: list[ProcessView],
                  request: RequestView | None, broker: dict[str, Any] | None = None) -> list[Problem]:
    """What someone glancing at the page must see first, errors before warnings. ``broker``: the
    API's ``broker_health()`` (a broker it cannot reach is an error)."""
    problems: list[Problem] = []
    if broker is not None and broker.get("broker") == "down":
        problems.append(Problem(severity="error", text=(
            f"broker {broker.get('broker_where')} unreachable ({broker.get('broker_error')}): write requests "
            "are refused (503) until it is back")))
    if stats.pipeline == "down":
        problems.append(Problem(severity="error", text="no pipeline status: is `std-daq up` running?"))
    elif stats.pipeline == "stale":
        age = f" (last update {stats_age:.0f} s ago)" if stats_age is not None else ""
        problems.append(Problem(severity="error", text=f"status is stale: the supervisor is gone{age}"))
    for proc in processes:
        restarted = f", restarted {proc.restarts}×" if proc.restarts else ""
        if proc.state == "down":
            code = f" (exit code {proc.exit_code})" if proc.exit_code is not None else ""
            problems.append(Problem(severity="error", text=f"{proc.name} is down{code}{restarted}"))
        elif proc.restarts and proc.state == "running":
            problems.append(Problem(severity="warning", text=f"{proc.name} restarted {proc.restarts}×"))
    if request is not None and request.state is RequestState.FAILED:
        problems.append(Problem(severity="error", text=f"request failed: {request.message or 'no reason'}"))
    if request is not None and (request.n_missing_images or request.n_incomplete_images):
        problems.append(Problem(
            severity="warning",
            text=f"request: {request.n_missing_images} images lost, {request.n_incomplete_images} incomplete",
        ))
    problems.sort(key=lambda p: p.severity != "error")
    return problems


# -- the producer and its viewers -----------------------------------------------------------------


class Dashboard:
    """Computes snapshots (and renders images) for all viewers of one API; see the module doc.

    Lives in the server's event loop: :meth:`events` is one viewer's stream; :meth:`close` (from any
    thread) ends every stream so the server can stop at once."""

    def __init__(self, backend: DaqBackend, interval: float = DEFAULT_INTERVAL,
                 image_interval: float = DEFAULT_IMAGE_INTERVAL) -> None:
        if interval <= 0 or image_interval <= 0:
            raise ValueError(f"dashboard intervals must be positive, got {interval}, {image_interval}")
        self.backend = backend
        self.interval = interval
        self.image_interval = image_interval
        self.viewers = 0
        self._renderer: ImageRenderer | None = None
        self._seq = 0
        self._next_image = 0.0
        self._snapshot: DashboardSnapshot | None = None
        self._snapshot_event: bytes | None = None
        self._image_event: bytes | None = None
        self._version = 0
        self._image_version = 0
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: asyncio.Task[None] | None = None
        self._closed = False
        self._compute_lock = threading.Lock()

    # -- computing (worker thread) ------------------------------------------------------------------
    def compute(self, with_image: bool = False) -> tuple[DashboardSnapshot, bytes | None]:
        """One snapshot (and, if asked and due, a newly rendered image as its SSE event)."""
        with self._compute_lock:
            backend = self.backend
            config = backend.config
            status = None
            if backend.stats_provider is not None:
                try:
                    status = backend.stats_provider()
                except Exception:
                    _logger.exception("stats provider failed")
            now = time.time()
            summary = summarize_stats(status, config)
            if backend.stats_provider is None:
                summary["pipeline"] = "unknown"
            stats = StatsResponse.model_validate(summary)
            stats_age = None if stats.updated is None else max(0.0, now - stats.updated)
            processes = process_views(status, now)
            active = backend.tracker.active(DETECTOR)
            request = request_view(backend.tracker.latest(DETECTOR), max(0, len(active) - 1), now)
            image_event = None
            if with_image:
                image_event = self._render_if_due()
            renderer = self._renderer
            self._seq += 1
            snapshot = DashboardSnapshot(
                seq=self._seq, time=now, interval=self.interval, viewers=self.viewers,
                detector=config.detector_name, detector_type=config.detector_type.value,
                n_modules=config.n_modules, image_shape=config.image_shape, image_dtype=config.image_dtype,
                broker=backend.broker_kind, problems=find_problems(stats, stats_age, processes, request,
                                                             backend.broker_health()),
                stats=stats, stats_age=stats_age, processes=processes, request=request,
                logs=log_views(status, config.detector_name), image=renderer.info if renderer else None,
                image_error=renderer.error if renderer else "no viewer: images are rendered only while "
                                                             "the dashboard is open",
            )
            return snapshot, image_event

    def _render_if_due(self) -> bytes | None:
        now = time.monotonic()
        if now < self._next_image:
            return None
        if self._renderer is None:
            self._renderer = ImageRenderer(ipc.image_ring_name(self.backend.config.detector_name))
        renderer = self._renderer
        if not renderer.render() or renderer.png is None or renderer.info is None:
            return None
        self._next_image = now + self.image_interval
        payload = json.dumps({"info": renderer.info.model_dump(mode="json"),
                              "png": base64.b64encode(renderer.png).decode("ascii")})
        return format_sse_event(data_str=payload, event="image", id=str(renderer.info.seq))

    # -- the producer (event loop) ----------------------------------------------------------------
    async def _produce(self) -> None:
        assert self._changed is not None
        try:
            while self.viewers > 0 and not self._closed:
                started = time.monotonic()
                try:
                    snapshot, image_event = await run_in_threadpool(self.compute, True)
                except Exception:
                    _logger.exception("dashboard snapshot failed")
                else:
                    async with self._changed:
                        self._snapshot = snapshot
                        self._snapshot_event = format_sse_event(
                            data_str=snapshot.model_dump_json(), event="snapshot", id=str(snapshot.seq))
                        self._version += 1
                        if image_event is not None:
                            self._image_event = image_event
                            self._image_version += 1
                        self._changed.notify_all()
                pause = self.interval - (time.monotonic() - started)
                if pause > 0:
                    async with self._changed:
                        if not self._closed and self.viewers > 0:
                            try:
                                await asyncio.wait_for(self._changed.wait(), pause)
                            except asyncio.TimeoutError:
                                pass
        finally:
            self._producer = None
            if self.viewers == 0 or self._closed:
                # the next viewer starts from fresh data, not from what was seen minutes ago
                self._snapshot = self._snapshot_event = self._image_event = None
                await run_in_threadpool(self._release_image)

    def _release_image(self) -> None:
        with self._compute_lock:
            if self._renderer is not None and (self.viewers == 0 or self._closed):
                self._renderer.close()
                self._renderer = None
                self._next_image = 0.0

    async def events(self) -> AsyncIterator[bytes]:
        """One viewer's stream: the latest image, then every new snapshot and image."""
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._loop = asyncio.get_running_loop()
        changed = self._changed
        self.viewers += 1
        if self._producer is None:
            self._producer = asyncio.get_running_loop().create_task(self._produce())
        seen, seen_image = -1, -1
        try:
            yield b"retry: 2000\n\n"
            while not self._closed:
                async with changed:
                    while not (self._closed or self._version > seen or self._image_version > seen_image):
                        await changed.wait()
                    if self._closed:
                        return
                    image = self._image_event if self._image_version > seen_image else None
                    snapshot = self._snapshot_event if self._version > seen else None
                    seen, seen_image = self._version, self._image_version
                if image is not None:
                    yield image
                if snapshot is not None:
                    yield snapshot
        finally:  # (no await here: this runs while the disconnected stream is being cancelled)
            self.viewers -= 1  # the producer stops within an interval once nobody watches

    def latest(self, max_age: float) -> DashboardSnapshot | None:
        """The producer's newest snapshot if it is younger than ``max_age`` seconds."""
        latest = self._snapshot
        return latest if latest is not None and time.time() - latest.time < max_age else None

    def close(self) -> None:
        """End every viewer's stream (thread-safe; the server calls it before it stops)."""
        self._closed = True
        loop, changed = self._loop, self._changed
        if loop is None or changed is None or loop.is_closed():
            return

        async def wake() -> None:
            async with changed:
                changed.notify_all()

        try:
            asyncio.run_coroutine_threadsafe(wake(), loop)
        except RuntimeError:  # the loop is gone: nothing waits
            pass


def close_dashboard(app: FastAPI) -> None:
    """End the dashboard streams of ``app`` (if it serves one) so the server stops without waiting."""
    dashboard = getattr(app.state, "dashboard", None)
    if isinstance(dashboard, Dashboard):
        dashboard.close()


# -- the router -----------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    return (resources.files("daq_backend.rest") / "static" / name).read_bytes()


def dashboard_router(app: FastAPI, backend: DaqBackend, interval: float = DEFAULT_INTERVAL,
                     image_interval: float = DEFAULT_IMAGE_INTERVAL) -> APIRouter:
    """``/ui`` (the page), its script and stylesheet, ``/ui/events`` and ``/ui/snapshot``; the
    :class:`Dashboard` is kept as ``app.state.dashboard``."""
    dashboard = Dashboard(backend, interval, image_interval)
    app.state.dashboard = dashboard
    router = APIRouter(tags=["dashboard"])
    page = _static("dashboard.html")
    assets = {name: (_static(name), media) for name, media in STATIC_FILES.items()}

    @router.get("/ui", response_class=Response, summary="The live dashboard (open it in a browser)",
                responses={200: {"content": {"text/html": {}}, "description": "HTML page"}})
    def ui() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @router.get("/ui/", include_in_schema=False)
    def ui_slash() -> RedirectResponse:
        return RedirectResponse("../ui")

    for name, (body, media) in assets.items():
        def asset(body: bytes = body, media: str = media) -> Response:
            return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

        router.add_api_route(f"/ui/{name}", asset, methods=["GET"], include_in_schema=False)

    # Left out of the OpenAPI schema: a stream that never ends is no operation a client generator or
    # fuzzer can call; /ui/snapshot documents the model its 'snapshot' events carry.
    @router.get("/ui/events", response_class=StreamingResponse, include_in_schema=False)
    def events() -> StreamingResponse:
        return StreamingResponse(dashboard.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get(
        "/ui/snapshot",
        response_model=DashboardSnapshot,
        summary="What the dashboard shows, once",
        description=(
            "The page itself follows GET /ui/events (text/event-stream): an event 'snapshot' with this "
            "model every interval (0.5 s) and an event 'image' ({info: ImageInfo, png: base64 PNG}) "
            "whenever a newer image was rendered (at most once a second)."
        ),
    )
    async def snapshot() -> DashboardSnapshot:
        latest = dashboard.latest(2 * dashboard.interval)
        if latest is not None:
            return latest
        computed, _ = await run_in_threadpool(dashboard.compute, False)
        return computed

    return router
