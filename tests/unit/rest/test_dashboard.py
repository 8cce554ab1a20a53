"""The dashboard's server side: snapshot contents from a supervisor status, the image rendered from a
real ring, and the event stream over real HTTP — one computation per interval for all viewers, the
image only when there is a new one, nothing computed once nobody watches, streams ended on stop."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from daq_backend import ipc
from daq_backend.formats import DTYPE_CODES, ImageMetadata, ImageStatus
from daq_backend.messages import RequestState
from daq_backend.ram_buffer import RingBuffer
from daq_backend.rest.dashboard import (
    Dashboard,
    DashboardSnapshot,
    counter_kind,
    counter_label,
    find_problems,
    flatten_counters,
    log_message,
    log_views,
    process_views,
    request_view,
)
from daq_backend.rest.dashboard_image import NO_VALUE_COLOR, ImageRenderer, colour_scale, encode_png, shrink
from daq_backend.rest.models import StatsResponse
from daq_backend.rest.request_tracker import RequestRecord
from daq_backend.testing import make_config, wait_for
from daq_backend.testing.rest import WAIT_S, RestHarness


def supervisor_status(now: float, **overrides: Any) -> dict[str, Any]:
    """A status file as ``Supervisor.status()`` writes it (with a counter family by reason)."""
    status = {
        "detector": "det", "supervisor_pid": 1, "updated": now - 0.2, "interval": 1.0, "stale": False,
        "services": [
            {"name": "receiver-0", "pid": 11, "alive": True, "restarts": 2, "exit_code": None, "uptime": 5.0,
             "counters": {"packets": 1000, "bytes": 8_000_000, "missing_packets": 3,
                          "duplicate_packets": 1, "rejected": {"bad_size": 2, "spoofed_source": 0}},
             "rates": {"packets": 256.0, "bytes": 2.0e6}, "stats_time": now - 0.5},
            {"name": "assembler", "pid": 12, "alive": False, "restarts": 0, "exit_code": -9, "uptime": 0.0,
             "counters": {"images": 10, "images_good": 9, "images_missing_packets": 1},
             "rates": {"images": 2.0}, "stats_time": now - 4.0},
            {"name": "writer", "pid": 13, "alive": True, "restarts": 0, "exit_code": None, "uptime": 5.0,
             "counters": {"images": 9, "images_lost": 0}, "rates": {"images": 2.0}, "stats_time": None},
        ],
        "logs": {
            "supervisor": {"warnings": 1, "errors": 1, "lines": [
                [now - 3.0, "ERROR", "ERROR det: assembler exited with -9 after 5.0 s; restart in 0.5 s"]]},
            "receiver-0": {"warnings": 4, "errors": 0, "lines": [
                [now - 4.0, "WARNING",
                 "2026-01-01 10:00:00,000 __main__ WARNING module 0: receive error: x"]]},
            "writer": {"warnings": 0, "errors": 0, "lines": "not a list"},
        },
    }
    status.update(overrides)
    return status


# -- pure pieces ----------------------------------------------------------------------------------


def test_counters_are_flattened_labelled_and_classified() -> None:
    flat = flatten_counters({"packets": 5, "ok": True, "rejected": {"bad_size": 2, "nan": float("nan")},
                             "text": "x"})
    assert flat == [("packets", 5), ("rejected.bad_size", 2)]
    assert counter_label("missing_packets") == "packets missing"
    assert counter_label("rejected.bad_size") == "rejected: bad size"
    assert counter_label("something_new") == "something new"
    assert [counter_kind(k) for k in ("packets", "images_lost", "rejected.bad_size", "duplicate_frames",
                                      "frames_incomplete", "out_of_order_packets", "bytes")] == [
        "count", "loss", "loss", "anomaly", "loss", "anomaly", "count"]


def test_process_views_and_problems_from_a_status() -> None:
    now = time.time()
    status = supervisor_status(now)
    procs = {p.name: p for p in process_views(status, now)}
    receiver, assembler, writer = procs["receiver-0"], procs["assembler"], procs["writer"]
    assert (receiver.role, receiver.state, receiver.restarts) == ("receiver", "running", 2)
    assert receiver.warnings == 4
    assert receiver.stats_age == pytest.approx(0.5, abs=0.01)
    counters = {c.key: c for c in receiver.counters}
    assert counters["rejected.bad_size"].value == 2 and counters["rejected.bad_size"].kind == "loss"
    assert counters["duplicate_packets"].kind == "anomaly"
    assert (assembler.state, assembler.exit_code, assembler.uptime) == ("down", -9, None)
    assert writer.role == "writer" and writer.stats_age is None
    stats = StatsResponse.model_validate({"pipeline": "up", "updated": now, "detector": {}, "writer": {},
                                          "receivers": {}, "lost": {}, "processes": {}})
    problems = find_problems(stats, 0.2, list(procs.values()), None)
    assert [(p.severity, p.text) for p in problems] == [
        ("error", "assembler is down (exit code -9)"), ("warning", "receiver-0 restarted 2×")]
    stale = stats.model_copy(update={"pipeline": "stale"})
    stale_text = find_problems(stale, 30.0, [], None)[0].text
    assert stale_text == "status is stale: the supervisor is gone (last update 30 s ago)"
    down = stats.model_copy(update={"pipeline": "down"})
    assert find_problems(down, None, [], None)[0].severity == "error"
    assert process_views(None, now) == []
    assert process_views(supervisor_status(now, stale=True), now)[0].state == "stale"


def test_log_lines_are_merged_oldest_first_and_shortened() -> None:
    now = time.time()
    lines = log_views(supervisor_status(now), "det")
    assert [(line.service, line.level, line.message) for line in lines] == [
        ("receiver-0", "WARNING", "module 0: receive error: x"),
        ("supervisor", "ERROR", "assembler exited with -9 after 5.0 s; restart in 0.5 s")]
    assert lines[0].text.startswith("2026-01-01 10:00:00,000")
    assert log_message('  File "x.py", line 3, in f', "ERROR") == '  File "x.py", line 3, in f'
    assert log_message("INFO:     Started server process [7]", "INFO") == "Started server process [7]"
    assert log_message("WARNING 2026-01-01 10:00:00,000 daq_backend.broker.service lost", "WARNING") == "lost"
    assert len(log_views(supervisor_status(now), "det", n=1)) == 1 and log_views(None, "det") == []


def test_request_view_progress_rate_and_eta() -> None:
    now = time.time()
    record = RequestRecord("r1", {"n_images": 100}, now - 20, state=RequestState.RUNNING, n_written=25,
                           n_images=100, init_timestamp=now - 10, n_incomplete_images=2)
    view = request_view(record, queued=1, now=now)
    assert view is not None
    assert (view.progress, view.queued, view.n_incomplete_images) == (0.25, 1, 2)
    assert view.images_per_second == pytest.approx(2.5) and view.eta == pytest.approx(30.0)
    done = request_view(RequestRecord("r2", None, now - 5, state=RequestState.COMPLETED, n_written=4,
                                      n_images=None, init_timestamp=now - 4, end_timestamp=now - 2), 0, now)
    assert done is not None and done.elapsed == pytest.approx(2.0)
    assert done.progress is None and done.eta is None
    assert request_view(None, 0, now) is None
    stats = StatsResponse.model_validate({"pipeline": "up", "updated": now, "detector": {}, "writer": {},
                                          "receivers": {}, "lost": {}, "processes": {}})
    assert [p.text for p in find_problems(stats, 0.1, [], view)] == ["request: 0 images lost, 2 incomplete"]


def test_shrink_keeps_block_maxima_and_nan_only_where_a_block_has_no_value() -> None:
    image = np.arange(24, dtype=np.uint16).reshape(4, 6)
    shown, step = shrink(image, side=3)
    assert step == 2
    np.testing.assert_array_equal(shown, [[7, 9, 11], [19, 21, 23]])
    floats = np.ones((4, 4), dtype=np.float32)
    floats[:2, :2] = np.nan
    floats[2, 2] = np.nan
    shown, step = shrink(floats, side=2)
    assert step == 2 and np.isnan(shown[0, 0]) and np.all(shown.ravel()[1:] == 1)
    same, step = shrink(image, side=10)
    assert step == 1 and same is image


def test_png_is_a_palette_image_with_the_scale_and_a_no_value_colour() -> None:
    image = np.linspace(0, 1000, 64 * 32, dtype=np.float32).reshape(32, 64)
    image[0, 0] = np.nan
    vmin, vmax = colour_scale(image)
    assert 0 < vmin < vmax < 1000
    renderer = ImageRenderer("unused-ring-name")
    png = Image.open(io.BytesIO(encode_png(image, vmin, vmax, renderer.palette)))
    assert png.mode == "P" and png.size == (64, 32)
    index = np.asarray(png)
    assert index[0, 0] == 255 and index[0, 1] == 0 and index[-1, -1] == 254
    palette = png.getpalette()
    assert palette is not None and tuple(palette[255 * 3: 256 * 3]) == NO_VALUE_COLOR
    assert colour_scale(np.full((4, 4), np.nan, dtype=np.float32)) == (0.0, 1.0)
    assert colour_scale(np.zeros((4, 4), dtype=np.uint16)) == (0.0, 1.0)


def _ring_with(name: str, shape: tuple[int, int], ids: list[int], status: int = 0) -> RingBuffer:
    ring = RingBuffer.create(name, shape[0] * shape[1] * 2, 4)
    for image_id in ids:
        pixels = np.full(shape, image_id, dtype=np.uint16)
        meta = ImageMetadata(image_id, shape[0], shape[1], DTYPE_CODES["uint16"], status, user_1=7)
        ring.write(image_id, pixels, meta.pack())
    return ring


def test_renderer_reads_the_newest_image_once_and_follows_a_recreated_ring(ipc_env: str) -> None:
    config = make_config("jungfrau")
    name = ipc.image_ring_name(config.detector_name)
    renderer = ImageRenderer(name)
    try:
        assert not renderer.render() and renderer.error is not None and "is the readout up" in renderer.error
        ring = _ring_with(name, (40, 1000), [1, 2], status=ImageStatus.MISSING_PACKETS)
        assert renderer.render() and renderer.info is not None
        info = renderer.info
        assert (info.image_id, info.status, info.status_name, info.n_missing_packets) == (
            2, 1, "missing packets", 7)
        assert (info.step, info.shown_height, info.shown_width, info.dtype) == (2, 20, 500, "uint16")
        assert not renderer.render() and renderer.info.seq == 1  # nothing new: nothing rendered
        ring.write(3, np.full((40, 1000), 3, dtype=np.uint16),
                   ImageMetadata(3, 40, 1000, DTYPE_CODES["uint16"]).pack())
        assert renderer.render() and renderer.info.image_id == 3 and renderer.info.status_name == "good"
        ring.close()  # the producer restarts: a new ring (new inode) with lower ids
        ring = _ring_with(name, (40, 1000), [1])
        assert renderer.render() and renderer.info.image_id == 1 and renderer.info.seq == 3
        ring.close()
        assert not renderer.render() and "no image ring" in str(renderer.error)
    finally:
        renderer.close()


# -- over HTTP ------------------------------------------------------------------------------------


class Viewer:
    """One dashboard viewer: reads ``/ui/events`` in a thread and keeps every event."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self._client = httpx.Client(base_url=url, timeout=httpx.Timeout(WAIT_S, read=WAIT_S))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        event, data = "message", []
        try:
            with self._client.stream("GET", "/ui/events") as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                    elif line == "" and data:
                        self.events.append((event, json.loads("\n".join(data))))
                        event, data = "message", []
        except (httpx.HTTPError, AssertionError) as exc:
            self.error = exc
        finally:
            self.ended.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [data for event, data in list(self.events) if event == kind]

    def close(self) -> None:
        self._client.close()
        self._thread.join(WAIT_S)


@pytest.fixture
def harness(ipc_env: str, tmp_path: Path) -> Iterator[tuple[RestHarness, list[int]]]:
    calls: list[int] = []

    def stats() -> dict[str, Any]:
        calls.append(1)
        return supervisor_status(time.time())

    rest = RestHarness(tmp_path, stats=stats)
    dashboard: Dashboard = rest.server.app.state.dashboard
    dashboard.interval, dashboard.image_interval = 0.1, 0.1
    try:
        yield rest, calls
    finally:
        rest.close()


def test_page_and_assets_are_served(harness: tuple[RestHarness, list[int]]) -> None:
    rest, _ = harness
    page = rest.http.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="ui/dashboard.js"' in page.text and 'href="ui/dashboard.css"' in page.text
    script = rest.http.get("/ui/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript") and "EventSource" in script.text
    assert rest.http.get("/ui/dashboard.css").headers["content-type"].startswith("text/css")
    assert rest.http.get("/ui/", follow_redirects=True).url.path == "/ui"
    assert rest.http.get("/ui/nothing.js").status_code == 404
    schema = rest.http.get("/openapi.json").json()
    assert {"/ui", "/ui/snapshot"} <= set(schema["paths"]) and "/ui/events" not in schema["paths"]
    assert "ImageInfo" in schema["components"]["schemas"]


def test_snapshot_matches_stats_and_names_the_problems(harness: tuple[RestHarness, list[int]]) -> None:
    rest, _ = harness
    snapshot = DashboardSnapshot.model_validate(rest.http.get("/ui/snapshot").json())
    assert snapshot.detector == rest.config.detector_name and snapshot.viewers == 0
    stats = rest.http.get("/stats").json()
    assert snapshot.stats.receivers.packets_per_second == stats["receivers"]["packets_per_second"] == 256.0
    assert snapshot.stats.lost.packets == stats["lost"]["packets"] == 3
    assert snapshot.stats.processes["receiver-0"].counters == stats["processes"]["receiver-0"]["counters"]
    assert "assembler is down (exit code -9)" in [p.text for p in snapshot.problems]
    assert snapshot.image is None and snapshot.image_error is not None  # images only while watched
    assert snapshot.request is None


def test_two_viewers_share_one_computation_and_get_new_images(
    harness: tuple[RestHarness, list[int]],
) -> None:
    rest, calls = harness
    assert rest.assembler is not None
    dashboard: Dashboard = rest.server.app.state.dashboard
    rest.assembler.produce(5, status=ImageStatus.MISSING_PACKETS, n_missing=3)
    viewers = [Viewer(rest.url), Viewer(rest.url)]
    try:
        def both_watch() -> bool:
            return all(any(s["viewers"] == 2 for s in v.of("snapshot")) for v in viewers)

        wait_for(both_watch, "snapshots that count two viewers", WAIT_S)
        first_images = [wait_for(lambda v=v: v.of("image"), "an image event", WAIT_S)[0] for v in viewers]
        for image in first_images:
            assert image["info"]["image_id"] == 5 and image["info"]["status_name"] == "missing packets"
            png = Image.open(io.BytesIO(base64.b64decode(image["png"])))
            assert png.size == (image["info"]["shown_width"], image["info"]["shown_height"]) == (512, 256)
        rest.assembler.produce(6)
        for v in viewers:
            wait_for(lambda v=v: any(i["info"]["image_id"] == 6 for i in v.of("image")), "image 6", WAIT_S)
        seqs = [{s["seq"] for s in v.of("snapshot")} for v in viewers]
        computed = len(calls)
        # every snapshot either viewer saw was computed once: the stats were read once per snapshot
        assert computed == dashboard._seq and max(seqs[0] | seqs[1]) <= computed
        assert len(seqs[0] & seqs[1]) >= 2
        images = [[i["info"]["seq"] for i in v.of("image")] for v in viewers]
        assert all(len(set(seq)) == len(seq) for seq in images)  # an image is sent once per viewer
    finally:
        for v in viewers:
            v.close()
    wait_for(lambda: dashboard.viewers == 0 and dashboard._producer is None, "the producer to stop", WAIT_S)
    assert dashboard._renderer is None  # the ring is no longer mapped
    stopped_at = len(calls)
    snapshot = rest.http.get("/ui/snapshot").json()  # computed on demand, without an image
    assert len(calls) == stopped_at + 1 and snapshot["viewers"] == 0


def test_request_progress_is_shown(harness: tuple[RestHarness, list[int]]) -> None:
    rest, _ = harness
    assert rest.assembler is not None
    answer = rest.http.post("/write_async", json={"output_file": rest.file("d.h5"), "n_images": 5})
    request_id = answer.json()["request_id"]
    rest.assembler.start(rate_hz=50)
    rest.wait_state(request_id, "completed")
    snapshot = rest.http.get("/ui/snapshot").json()
    request = snapshot["request"]
    assert request["request_id"] == request_id and request["state"] == "completed"
    assert request["n_written"] == request["n_images"] == 5 and request["progress"] == 1.0
    assert request["output_file"] == rest.file("d.h5")


def test_stopping_the_server_ends_open_streams(harness: tuple[RestHarness, list[int]]) -> None:
    rest, _ = harness
    viewer = Viewer(rest.url)
    try:
        wait_for(lambda: viewer.of("snapshot"), "a first snapshot", WAIT_S)
        rest.server.stop()
        assert viewer.ended.wait(WAIT_S), "the event stream did not end when the server stopped"
        assert viewer.error is None
    finally:
        viewer.close()
