"""Pieces of the ophyd-async device on their own: the typed REST client (both flavours, against a small
HTTP server that answers what a test wants), the bounded waits and their errors, the dead times and
timing modes, and the folders a ``PathProvider`` asks for."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from ophyd_async.core import DetectorTrigger, PathInfo, init_devices, set_mock_value

from daq_backend.messages import RequestState
from daq_backend.rest.models import HealthResponse, RequestStatus
from daq_backend.testing import free_tcp_port
from std_daq_ophyd.async_devices import (
    DEADTIME_S,
    TIMING_OF_TRIGGER,
    AcquisitionStalled,
    AcquisitionStepError,
    StdDaqAsyncDetector,
)
from std_daq_ophyd.async_devices.data_logic import make_directories
from std_daq_ophyd.async_devices.steps import in_step, poll_until
from std_daq_ophyd.async_devices.trigger_logic import deadtime_of
from std_daq_ophyd.client import AsyncStdDaqClient, StdDaqClient, StdDaqError, StdDaqUnreachable

REQUEST = {
    "request_id": "r1", "kind": "detector", "state": "running", "n_written": 7, "n_images": 10,
    "n_missing_images": 1, "n_incomplete_images": 2, "output_file": "/data/x.h5", "message": None,
    "init_timestamp": 1.0, "end_timestamp": None, "created": 0.5, "request": {"n_images": 10},
    "services": {"writer_agent": "request_progress"},
}
HEALTH = {"status": "ok", "detector_name": "JF01", "uptime": 3.0, "broker": "up", "broker_kind": "embedded",
          "requests_active": 1,
          "pipeline": "up"}


class FakeDaq:
    """Answers ``routes[path] = (status code, body)`` (a body of ``str`` is sent as it is) and records
    the headers of every request."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, Any]] = {}
        self.headers: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                fake.headers.append(dict(self.headers))
                code, body = fake.routes.get(self.path.split("?")[0], (404, {"detail": f"no {self.path}"}))
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                self._answer()

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def fake() -> Iterator[FakeDaq]:
    server = FakeDaq()
    yield server
    server.close()


def test_both_clients_return_the_rest_models_and_send_the_token(fake: FakeDaq) -> None:
    fake.routes = {"/health": (200, HEALTH), "/requests/r1": (200, REQUEST),
                   "/write_async": (200, {"request_id": "r1"})}
    sync = StdDaqClient(fake.url, token="s3cret")
    health = sync.health()
    assert isinstance(health, HealthResponse) and health.detector_name == "JF01"
    status = sync.request_status("r1")
    assert isinstance(status, RequestStatus) and status.state is RequestState.RUNNING
    assert sync.write_async({"output_file": "/data/x.h5", "n_images": 10}) == "r1"
    sync.close()

    async def run() -> tuple[HealthResponse, RequestStatus]:
        client = AsyncStdDaqClient(fake.url, token="s3cret")
        try:
            return await client.health(), await client.request_status("r1")
        finally:
            await client.aclose()

    health, status = asyncio.run(run())
    assert health.requests_active == 1 and status.n_written == 7
    assert {h.get("Authorization") for h in fake.headers} == {"Bearer s3cret"}
    assert StdDaqClient(fake.url).headers == {}


def test_refusals_and_strangers_become_clear_errors(fake: FakeDaq) -> None:
    fake.routes = {"/requests/gone": (404, {"detail": "unknown request_id 'gone'"}),
                   "/health": (200, "<html>a web server</html>"),
                   "/requests/odd": (200, {"state": "running"}),
                   "/write_async": (401, {"detail": "a bearer token is required"})}
    client = StdDaqClient(fake.url)
    refused = r"GET /requests/gone failed \(HTTP 404\): unknown request_id"
    with pytest.raises(StdDaqError, match=refused) as info:
        client.request_status("gone")
    assert info.value.status_code == 404
    with pytest.raises(StdDaqUnreachable, match="not JSON: is this a std-daq backend"):
        client.health()
    with pytest.raises(StdDaqError, match="/requests/odd answered in an unexpected shape"):
        client.request_status("odd")
    with pytest.raises(StdDaqError, match=r"refused \(HTTP 401\): a bearer token .*sent no token") as info:
        client.write_async({"output_file": "/data/x.h5", "n_images": 1})
    assert info.value.status_code == 401
    nobody = f"http://127.0.0.1:{free_tcp_port()}"
    with pytest.raises(StdDaqUnreachable, match=f"std-daq backend at {nobody} is unreachable"):
        asyncio.run(AsyncStdDaqClient(nobody).health())


def test_a_bounded_wait_names_its_step_and_what_it_saw() -> None:
    looks = iter(range(1000))

    async def look() -> int:
        return next(looks)

    async def run() -> None:
        await poll_until(look, lambda v: v < 0, step="wait for idle", bound=0.05, poll=0.01,
                         waiting_for="detector X to go idle", show=lambda v: f"look {v}")

    with pytest.raises(AcquisitionStalled, match=r"wait for idle: still waiting for detector X to go idle "
                                                 r"after 0.05 s \(last seen: look \d+\)") as info:
        asyncio.run(run())
    assert info.value.step == "wait for idle" and isinstance(info.value, TimeoutError)


def test_a_refusal_inside_a_step_names_the_step() -> None:
    async def run() -> None:
        async with in_step("arm"):
            raise StdDaqError("std-daq POST /detector/x failed (HTTP 409): detector is already running", 409)

    with pytest.raises(AcquisitionStepError, match="arm: std-daq POST .* already running") as info:
        asyncio.run(run())
    assert info.value.step == "arm" and not isinstance(info.value, TimeoutError)


def test_timing_modes_and_dead_times() -> None:
    assert TIMING_OF_TRIGGER == {DetectorTrigger.INTERNAL: "AUTO_TIMING",
                                 DetectorTrigger.EXTERNAL_EDGE: "TRIGGER_EXPOSURE",
                                 DetectorTrigger.EXTERNAL_LEVEL: "GATED"}
    assert deadtime_of("jungfrau") == 20e-6 and set(DEADTIME_S) == {"jungfrau", "eiger", "gigafrost"}
    with pytest.raises(ValueError, match="no dead time known for detector type 'pco' .*eiger, gigafrost"):
        deadtime_of("pco")


def test_the_deadtime_follows_the_detector_type(tmp_path: Path) -> None:
    """In mock mode (ophyd-async's own), the device reports every trigger type and the dead time of
    whatever type the DAQ said it drives."""
    RunEngine({}, call_returns_result=False)  # the bluesky event loop
    with init_devices(mock=True):
        det = StdDaqAsyncDetector("http://127.0.0.1:1", name="det")

    async def deadtime(kind: str) -> tuple[set[DetectorTrigger], float | None]:
        set_mock_value(det.driver.detector_type, kind)
        return await det.get_trigger_deadtime()

    triggers, eiger = call_in_bluesky_event_loop(deadtime("eiger"))
    assert triggers == set(DetectorTrigger) and eiger == DEADTIME_S["eiger"]
    assert call_in_bluesky_event_loop(deadtime("gigafrost"))[1] == DEADTIME_S["gigafrost"]


def test_path_info_folders_are_created_below_their_depth(tmp_path: Path) -> None:
    target = tmp_path / "p12345" / "raw"
    make_directories(PathInfo(directory_path=PurePosixPath(target), filename="f"))
    assert not target.exists()  # depth 0: nothing is created
    make_directories(PathInfo(directory_path=PurePosixPath(target), filename="f", create_dir_depth=-2))
    assert target.is_dir()
    deep = tmp_path / "missing" / "a" / "b"
    with pytest.raises(FileNotFoundError, match="missing/a does not exist"):
        make_directories(PathInfo(directory_path=PurePosixPath(deep), filename="f", create_dir_depth=-1))


def test_an_unknown_compression_is_refused_when_the_device_is_made() -> None:
    with pytest.raises(ValueError, match="compression must be one of none, bitshuffle-lz4, got 'zip'"):
        StdDaqAsyncDetector("http://127.0.0.1:1", compression="zip", name="det")
