"""REST API against a live server: the seed's endpoints and shapes, request status, errors, admin interface.

Every test runs a real DAQ in the test process (embedded broker, real writer agent + h5 writer,
simulated detector control) behind uvicorn on a free port; images come from the writer tests'
stand-in assembler. The full flow with the real readout is in ``test_rest_flow.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests
from std_daq_client import StdDaqAdminException, StdDaqClient

from daq_backend.control.sls import SlsDetectorControl
from daq_backend.rest.stats_summary import summarize_stats
from daq_backend.testing import free_udp_base, wait_for
from daq_backend.testing.rest import WAIT_S, RestHarness
from daq_backend.testing.writer import expected_pixels
from daq_backend.writer import layout

CONFIG_KEYS = {
    "det_name",
    "triggers",
    "timing",
    "frames",
    "period",
    "exptime",
    "dr",
    "speed",
    "tengiga",
    "threshold",
}


def post(rest: RestHarness, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    """POST like the seed README does (``requests``, JSON content type)."""
    headers = {"Content-type": "application/json"}
    return requests.post(rest.url + path, json=body, headers=headers, timeout=WAIT_S, **kwargs)


def read_file(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    with h5py.File(path, "r") as h5:
        return h5[layout.IMAGE_ID][:], h5[layout.DATA][:], dict(h5.attrs)


# -- seed endpoints: shapes -----------------------------------------------------------------------


def test_write_sync_returns_the_seed_shape_and_writes_the_file(rest: RestHarness) -> None:
    assert rest.assembler is not None
    rest.assembler.start(rate_hz=100)
    data = {"sources": "eiger", "n_images": 10, "output_file": rest.file("test.h5")}
    r = post(rest, "/write_sync", data)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"request_id", "response"}
    assert uuid.UUID(answer["request_id"])
    response = answer["response"]
    assert {"output_file", "status", "init_timestamp", "end_timestamp"} <= set(response)
    assert response["status"] == "request_success"
    assert response["output_file"] == rest.file("test.h5")
    assert response["state"] == "completed" and response["n_written"] == 10
    assert response["init_timestamp"] <= response["end_timestamp"]
    ids, images, attrs = read_file(rest.file("test.h5"))
    assert len(ids) == 10 and attrs["status"] == "completed"
    for image_id, image in zip(ids, images, strict=True):
        np.testing.assert_array_equal(image, expected_pixels(rest.config, int(image_id)))


def test_write_async_answers_at_once_and_progress_is_visible(rest: RestHarness) -> None:
    assert rest.assembler is not None
    r = post(rest, "/write_async", {"sources": "eiger", "n_images": 40, "output_file": rest.file("a.h5")})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"request_id", "output_file"}  # the seed's key, and which file it writes
    assert r.json()["output_file"] == rest.file("a.h5")
    request_id = r.json()["request_id"]
    running = rest.wait_writing(request_id)
    assert running["state"] == "running"
    assert running["n_written"] == 0 and running["n_images"] == 40
    assert running["output_file"] == rest.file("a.h5")
    rest.assembler.start(rate_hz=20)
    midway = wait_for(
        lambda: (a := rest.http.get(f"/requests/{request_id}").json())["n_written"] > 0 and a,
        "progress",
        WAIT_S,
    )
    assert midway["state"] in ("running", "completed")
    done = rest.wait_state(request_id, "completed")
    assert done["n_written"] == 40 and done["message"] == "Completed."
    assert done["end_timestamp"] >= done["init_timestamp"]
    assert done["services"] == {"writer_agent": "request_success"}


def wait_for_rows(path: str, n: int) -> None:
    """Wait until the file holds ``n`` flushed images (read from the file, not from progress)."""

    def rows() -> bool:
        try:
            with layout.open_image_file(path) as h5:
                return layout.written_rows(h5) >= n
        except (OSError, KeyError):
            return False

    wait_for(rows, f"{n} images in {path}", WAIT_S)


def test_write_sync_waits_as_long_as_the_acquisition_needs(rest: RestHarness) -> None:
    """Weakness 2: the seed gave up after a fixed 10 s. Here the call returns when the file is done."""
    assert rest.assembler is not None
    result: dict[str, Any] = {}

    def call() -> None:
        result["r"] = post(rest, "/write_sync", {"n_images": 2, "output_file": rest.file("slow.h5")})

    thread = threading.Thread(target=call)
    thread.start()
    wait_for_active(rest)
    time.sleep(11.0)  # longer than the seed's fixed limit, with no image at all
    assert thread.is_alive(), "write_sync returned before the acquisition ended"
    rest.assembler.produce(1)
    rest.assembler.produce(2)
    thread.join(WAIT_S)
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["response"]["status"] == "request_success"
    assert r.json()["response"]["n_written"] == 2


def wait_for_active(rest: RestHarness) -> str:
    active = wait_for(lambda: rest.backend.tracker.active(), "an active request", WAIT_S)
    return rest.wait_writing(active[0].request_id)["request_id"]


def test_write_sync_with_timeout_ends_when_no_image_comes(rest: RestHarness) -> None:
    r = post(rest, "/write_sync", {"n_images": 3, "output_file": rest.file("t.h5"), "timeout": 0.5})
    assert r.status_code == 200, r.text
    response = r.json()["response"]
    assert response["status"] == "request_fail"
    assert response["state"] == "interrupted"
    assert "no image arrived for 0.5 s" in response["message"]
    assert read_file(rest.file("t.h5"))[2]["status"] == "interrupted"


def test_write_kill_stops_a_running_request_like_the_readme(rest: RestHarness) -> None:
    assert rest.assembler is not None
    data = {"sources": "eiger", "n_images": 1000, "output_file": rest.file("kill.h5")}
    r = post(rest, "/write_async", data)
    request_id = str(r.json()["request_id"])
    rest.wait_writing(request_id)
    for image_id in range(1, 4):
        rest.assembler.produce(image_id)
    wait_for_rows(rest.file("kill.h5"), 3)
    r = post(rest, "/write_kill", {"request_id": request_id})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["request_id"] == request_id
    response = answer["response"]
    assert {"output_file", "status", "init_timestamp", "end_timestamp"} <= set(response)
    # weakness 3: a kill is reported as what it is, not as a success
    assert response["status"] == "request_fail" and response["state"] == "interrupted"
    assert response["message"].startswith("Interrupted")
    ids, _, attrs = read_file(rest.file("kill.h5"))
    assert list(ids) == [1, 2, 3] and attrs["status"] == "interrupted"
    # killing again answers the same final result
    again = post(rest, "/write_kill", {"request_id": request_id})
    assert again.status_code == 200 and again.json()["response"]["state"] == "interrupted"


def test_a_write_while_one_runs_is_409_naming_it_and_never_queued(rest: RestHarness) -> None:
    first = post(rest, "/write_async", {"n_images": 100, "output_file": rest.file("1.h5")}).json()[
        "request_id"
    ]
    rest.wait_state(first, "running")
    for path in ("/write_async", "/write_sync"):
        r = post(rest, path, {"n_images": 100, "output_file": rest.file("2.h5")})
        assert r.status_code == 409, r.text
        assert r.json()["running_request_id"] == first
        busy = f"Writer is busy with request {first} (running, writing {rest.file('1.h5')})"
        assert busy in r.json()["detail"]
    assert [a.request_id for a in rest.backend.tracker.active()] == [first]  # nothing queued
    r = rest.http.post(f"/requests/{first}/stop")
    assert r.status_code == 200 and r.json()["state"] == "interrupted"
    assert not os.path.exists(rest.file("2.h5"))
    r = post(rest, "/write_async", {"n_images": 1, "output_file": rest.file("3.h5")})
    assert r.status_code == 200, r.text  # the writer is free again
    rest.http.post(f"/requests/{r.json()['request_id']}/stop")


def test_request_status_of_an_unknown_id_is_404(rest: RestHarness) -> None:
    r = rest.http.get("/requests/nope")
    assert r.status_code == 404 and "unknown request_id 'nope'" in r.json()["detail"]
    r = post(rest, "/write_kill", {"request_id": "5b50509f-e441-4f9a-8031-de10eceab9d6"})
    assert r.status_code == 404 and "unknown request_id" in r.json()["detail"]
    assert rest.http.post("/requests/nope/stop").status_code == 404


def test_no_writer_agent_on_the_tag_is_a_clear_503(rest: RestHarness) -> None:
    """Weakness 18: a request to a tag nobody serves vanished silently in the seed."""
    rest.stop_writer()
    r = post(rest, "/write_async", {"n_images": 1, "output_file": rest.file("x.h5")})
    assert r.status_code == 503
    assert f"no writer agent is listening on tag '{rest.config.detector_name}'" in r.json()["detail"]
    assert rest.backend.tracker.active() == []
    assert rest.http.get("/health").status_code == 200


# -- write request: bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/write_sync", "/write_async", "/write_kill", "/detector", "/detector/x"])
@pytest.mark.parametrize("raw", [b'{"n_images": 5,', b"", b"\xff\xfe{", b"not json"])
def test_malformed_json_is_400(rest: RestHarness, path: str, raw: bytes) -> None:
    r = requests.post(rest.url + path, data=raw, headers={"Content-type": "application/json"}, timeout=WAIT_S)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "malformed JSON body" in detail or "empty request body" in detail
    if path.startswith("/detector"):
        assert r.json()["response"] == detail


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"output_file": "F"}, "n_images: missing (required)"),
        ({"n_images": 5}, "output_file: missing (required)"),
        ({"n_images": "ten", "output_file": "F"}, "n_images: Input should be a valid integer"),
        ({"n_images": 0, "output_file": "F"}, "n_images: Input should be greater than or equal to 1"),
        ({"n_images": 2.5, "output_file": "F"}, "n_images: Input should be a valid integer"),
        ({"n_images": 5, "output_file": "n" * 300 + ".h5"}, "name may have at most 255 bytes"),
        ({"n_images": 2**64, "output_file": "F"}, "n_images: Input should be less than or equal to 10000"),
        ({"n_images": 5, "output_file": "F", "n_image": 3}, "n_image: unknown field"),
        ({"n_images": 5, "output_file": "F", "timeout": -1}, "timeout: Input should be greater than 0"),
        ({"n_images": 5, "output_file": "F", "compression": "zip"}, "compression: Input should be"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_bad_write_requests_are_422_and_name_the_field(rest: RestHarness, body: Any, message: str) -> None:
    if isinstance(body, dict) and body.get("output_file") == "F":
        body["output_file"] = rest.file("bad.h5")
    for path in ("/write_sync", "/write_async"):
        r = post(rest, path, body)
        assert r.status_code == 422, r.text
        assert message in r.json()["detail"]
    assert not Path(rest.file("bad.h5")).exists()
    assert rest.backend.tracker.active() == []


def test_existing_file_is_refused_and_kept(rest: RestHarness) -> None:
    path = Path(rest.file("exists.h5"))
    path.write_bytes(b"precious")
    r = post(rest, "/write_sync", {"n_images": 1, "output_file": str(path)})
    assert r.status_code == 422 and "already exists" in r.json()["detail"]
    assert path.read_bytes() == b"precious"


def test_paths_outside_the_allowed_roots_are_403(rest: RestHarness, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (rest.data / "escape").symlink_to(outside)
    for output_file in (
        str(outside / "x.h5"),
        "/etc/x.h5",
        f"{rest.data}/../elsewhere/x.h5",
        f"{rest.data}/escape/x.h5",
    ):
        for path in ("/write_sync", "/write_async"):
            r = post(rest, path, {"n_images": 1, "output_file": output_file})
            assert r.status_code == 403, (output_file, r.text)
            assert "is outside the folders this DAQ writes to" in r.json()["detail"]
    assert list(outside.iterdir()) == []


# -- detector endpoints ---------------------------------------------------------------------------


def test_get_detector_has_the_seed_keys(rest: RestHarness) -> None:
    r = requests.get(url=rest.url + "/detector/" + rest.config.detector_name, timeout=WAIT_S)
    assert r.status_code == 200
    config = r.json()
    assert set(config) == CONFIG_KEYS
    assert config["det_name"] == rest.config.detector_name
    assert config["timing"] == "timingMode.AUTO_TIMING"
    assert config["speed"] == "speedLevel.FULL_SPEED"
    # looked up case-insensitively and by detector type, as the README's /detector/eiger
    assert requests.get(rest.url + "/detector/JUNGFRAU", timeout=WAIT_S).json()["det_name"] == "jungfrau"


def test_set_detector_config_both_routes(rest: RestHarness) -> None:
    name = rest.config.detector_name
    r = post(rest, f"/detector/{name}", {"config": {"frames": 5, "period": 0.002, "exptime": 0.0005}})
    assert r.status_code == 200 and r.json() == {"response": "request_success"}
    r = post(
        rest, "/detector", {"det_name": "jungfrau", "config": {"triggers": 2, "timing": "TRIGGER_EXPOSURE"}}
    )
    assert r.status_code == 200 and r.json() == {"response": "request_success"}
    config = rest.http.get(f"/detector/{name}").json()
    assert config["frames"] == 5 and config["period"] == 0.002 and config["exptime"] == 0.0005
    assert config["triggers"] == 2 and config["timing"] == "timingMode.TRIGGER_EXPOSURE"
    # a GET answer can be posted back unchanged
    back = {k: v for k, v in config.items() if k not in ("det_name", "threshold")}
    assert post(rest, f"/detector/{name}", {"config": back}).json() == {"response": "request_success"}


@pytest.mark.parametrize(
    ("values", "response"),
    [
        ({"frames": 5, "FOO": 1}, "Parameter not valid: FOO"),
        ({"frames": "five"}, "frames: Input should be a valid integer"),
        ({"frames": 0}, "frames: Input should be greater than or equal to 1"),
        ({"exptime": -1.0}, "exptime: Input should be greater than 0"),
        ({"timing": "SOMETIMES"}, "timing: Input should be"),
        ({"dr": 8}, "dr: 8 not supported by jungfrau"),
        ({"tengiga": "yes"}, "tengiga"),
    ],
)
def test_bad_detector_parameters_are_400_with_the_seed_text(
    rest: RestHarness, values: dict[str, Any], response: str
) -> None:
    before = rest.http.get("/detector/jungfrau").json()
    r = post(rest, "/detector", {"det_name": "jungfrau", "config": values})
    assert r.status_code == 400, r.text
    assert r.json()["response"].startswith(response), r.json()
    assert r.json()["detail"] == r.json()["response"]
    assert rest.http.get("/detector/jungfrau").json() == before  # nothing was applied


def test_detector_commands_and_state_conflicts(rest: RestHarness) -> None:
    name = rest.config.detector_name
    assert post(rest, f"/detector/{name}", {"cmd": "STATUS"}).json() == {
        "response": "request_success",
        "status": "IDLE",
    }
    r = post(rest, f"/detector/{name}", {"cmd": "STOP"})
    assert r.status_code == 409 and r.json()["response"] == "detector is not running"
    post(rest, f"/detector/{name}", {"config": {"frames": 1_000_000, "period": 0.01}})
    assert post(rest, f"/detector/{name}", {"cmd": "start"}).json() == {"response": "request_success"}
    try:
        assert post(rest, f"/detector/{name}", {"cmd": "STATUS"}).json()["status"] == "RUNNING"
        r = post(rest, f"/detector/{name}", {"cmd": "START"})
        assert r.status_code == 409 and r.json()["response"] == "detector is already running"
        r = post(rest, f"/detector/{name}", {"config": {"frames": 3}})
        assert r.status_code == 409 and "while the detector is running" in r.json()["response"]
    finally:
        assert post(rest, f"/detector/{name}", {"cmd": "STOP"}).json() == {"response": "request_success"}
    assert post(rest, f"/detector/{name}", {"cmd": "STATUS"}).json()["status"] == "IDLE"


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/detector/nosuch", {"cmd": "STATUS"}, 404, "unknown detector 'nosuch'"),
        ("/detector", {"det_name": "nosuch", "cmd": "STATUS"}, 404, "unknown detector 'nosuch'"),
        ("/detector", {"config": {"frames": 1}}, 422, "det_name: missing"),
        ("/detector/jungfrau", {"cmd": "REBOOT"}, 422, "unknown command 'REBOOT'"),
        ("/detector/jungfrau", {}, 422, "nothing to do"),
        ("/detector/jungfrau", {"config": [1]}, 422, "config: Input should be a valid dictionary"),
        ("/detector/jungfrau", {"cmd": 1}, 422, "cmd: Input should be a valid string"),
        ("/detector/jungfrau", {"config": {}, "extra": 1}, 422, "extra: unknown field"),
        ("/detector/jungfrau", {"det_name": "other", "cmd": "STATUS"}, 404, "unknown detector 'other'"),
    ],
)
def test_bad_detector_requests(rest: RestHarness, path: str, body: Any, status: int, message: str) -> None:
    r = post(rest, path, body)
    assert r.status_code == status, r.text
    assert message in r.json()["response"]


def test_unknown_detector_get_is_404(rest: RestHarness) -> None:
    r = rest.http.get("/detector/eiger")
    assert r.status_code == 404
    assert "unknown detector 'eiger'" in r.json()["response"]
    assert rest.config.detector_name in r.json()["detail"]  # lists the known ones


def test_unreachable_detector_is_503_and_the_api_stays_up(ipc_env: str, tmp_path: Path) -> None:
    port = free_udp_base(1)  # nothing listens on this TCP port either
    control = SlsDetectorControl(
        "offline",
        "jungfrau",
        f"127.0.0.1:{port}",
        shm_id=900 + os.getpid() % 90,
        timeout=10,
        connect_timeout=20,
    )
    harness = RestHarness(tmp_path, controls={"offline": control}, assembler=False, writer=False)
    try:
        for method, body in (("get", None), ("post", {"cmd": "STATUS"}), ("post", {"config": {"frames": 2}})):
            r = harness.http.request(method, "/detector/offline", json=body)
            assert r.status_code == 503, r.text
            assert r.json()["response"].startswith("Detector unreachable: offline")
        # validation happens before the detector is contacted: a bad value is still a 400
        r = harness.http.post("/detector/offline", json={"config": {"FOO": 1}})
        assert r.status_code == 400 and r.json()["response"] == "Parameter not valid: FOO"
        assert harness.http.get("/health").json()["status"] == "ok"
    finally:
        harness.close()


# -- own endpoints --------------------------------------------------------------------------------


def test_health_config_and_openapi(rest: RestHarness) -> None:
    health = rest.http.get("/health").json()
    assert health["status"] == "ok" and health["detector_name"] == rest.config.detector_name
    assert health["broker"] == "up" and health["broker_kind"] == "embedded" and health["requests_active"] == 0
    assert rest.http.get("/config").json() == rest.config.to_json_dict()
    schema = rest.http.get("/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/write_sync", "/write_async", "/write_kill", "/detector", "/detector/{det_name}",
        "/requests/{request_id}", "/requests/{request_id}/stop", "/health", "/stats", "/preview", "/config",
        "/writer/write_sync", "/writer/write_async", "/writer/status", "/writer/stop", "/daq/config",
        "/daq/stats", "/daq/logs/{n_logs}", "/daq/deployment", "/epics/write_async",
    } <= paths  # fmt: skip
    body = schema["paths"]["/write_sync"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/WriteRequest"}
    assert "n_images" in schema["components"]["schemas"]["WriteRequest"]["properties"]


def test_preview_is_a_png_of_the_latest_image(rest: RestHarness) -> None:
    from daq_backend.rest.server import image_ring_preview

    rest.backend.preview_provider = image_ring_preview(rest.config)
    assert rest.assembler is not None
    r = rest.http.get("/preview")
    assert r.status_code == 404 and "no image" in r.json()["detail"]
    rest.assembler.produce(7)
    r = rest.http.get("/preview")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_preview_without_a_source_is_404(rest: RestHarness) -> None:
    r = rest.http.get("/preview")
    assert r.status_code == 404 and "no preview source" in r.json()["detail"]


SUPERVISOR_STATUS = {
    "detector": "d",
    "updated": 1700000000.0,
    "stale": False,
    "services": [
        {"name": "receiver-0", "pid": 11, "alive": True, "restarts": 0,
         "counters": {"packets": 1000, "missing_packets": 3, "frames_incomplete": 1},
         "rates": {"packets": 12800.0, "bytes": 105e6}},
        {"name": "receiver-1", "pid": 12, "alive": True, "restarts": 1,
         "counters": {"packets": 990, "missing_packets": 2}, "rates": {"packets": 12700.0, "bytes": 104e6}},
        {"name": "assembler", "pid": 13, "alive": True, "restarts": 0,
         "counters": {"images": 500, "images_missing_packets": 2, "images_id_mismatch": 1},
         "rates": {"images": 100.0, "bytes": 209715200.0}},
        {"name": "writer", "pid": 14, "alive": False, "restarts": 2, "counters": {"images": 400},
         "rates": {"images": 50.0}},
    ],
}  # fmt: skip


def test_stats_summarise_the_supervisor_counters(rest: RestHarness) -> None:
    rest.backend.stats_provider = lambda: SUPERVISOR_STATUS
    stats = rest.http.get("/stats").json()
    assert stats["pipeline"] == "up" and stats["updated"] == 1700000000.0
    assert stats["detector"] == {"images_per_second": 100.0, "bytes_per_second": 209715200.0}
    # the writer reports no byte rate: derived from the image size
    assert stats["writer"] == {"images_per_second": 50.0, "bytes_per_second": 50.0 * rest.config.image_nbytes}
    assert stats["receivers"] == {"packets_per_second": 25500.0, "bytes_per_second": 209e6}
    assert stats["lost"] == {
        "packets": 5, "frames_incomplete": 1, "images_missing_packets": 2, "images_id_mismatch": 1,
        "missing_module_frames": 0,
    }  # fmt: skip
    assert stats["processes"]["writer"]["alive"] is False and stats["processes"]["writer"]["restarts"] == 2
    admin = StdDaqClient(rest.url).get_stats()
    assert admin == {"detector": stats["detector"], "writer": stats["writer"]}
    assert rest.http.get("/health").json()["pipeline"] == "up"
    rest.backend.stats_provider = lambda: None
    assert rest.http.get("/stats").json()["pipeline"] == "down"
    assert summarize_stats({**SUPERVISOR_STATUS, "stale": True}, rest.config)["pipeline"] == "stale"


def test_stats_without_a_provider_are_zero(rest: RestHarness) -> None:
    stats = rest.http.get("/stats").json()
    assert stats["pipeline"] == "unknown" and stats["processes"] == {}
    assert stats["detector"] == {"images_per_second": 0.0, "bytes_per_second": 0.0}


# -- admin interface (std_daq_client) -------------------------------------------------------------


def test_std_daq_client_write_sync_status_and_logs(rest: RestHarness) -> None:
    assert rest.assembler is not None
    client = StdDaqClient(url_base=rest.url)
    status = client.get_status()
    assert status["state"] == "READY" and status["acquisition"]["state"] == "FINISHED"
    assert client.get_logs(5) == []
    rest.assembler.start(rate_hz=100)
    writer = client.start_writer_sync({"n_images": 5, "output_file": rest.file("sync.h5"), "run_id": 42})
    assert writer["state"] == "READY"
    acquisition = writer["acquisition"]
    assert acquisition["state"] == "FINISHED" and acquisition["message"] == "Completed."
    assert acquisition["info"] == {"n_images": 5, "output_file": rest.file("sync.h5"), "run_id": 42}
    assert acquisition["stats"]["n_write_completed"] == 5 and acquisition["stats"]["n_write_requested"] == 5
    assert acquisition["stats"]["start_time"] <= acquisition["stats"]["stop_time"]
    with h5py.File(rest.file("sync.h5"), "r") as h5:
        assert h5[layout.ENTRY].attrs["run_id"] == 42
        assert h5[layout.DATA].shape[0] == 5
    logs = client.get_logs(5)
    assert isinstance(logs, list) and len(logs) == 1 and logs[0] == acquisition


def test_std_daq_client_async_stop_and_busy(rest: RestHarness) -> None:
    client = StdDaqClient(url_base=rest.url)
    writer = client.start_writer_async(
        {"n_images": 100, "output_file": rest.file("async.h5"), "run_id": "run_7"}
    )
    assert writer["state"] == "WRITING"
    assert writer["acquisition"]["state"] == "WAITING_IMAGES"
    assert writer["acquisition"]["info"]["run_id"] == "run_7"
    with pytest.raises(StdDaqAdminException, match="Writer is busy"):
        client.start_writer_async({"n_images": 1, "output_file": rest.file("other.h5")})
    active = rest.backend.tracker.active()[0].request_id
    rest.wait_writing(active)
    assert rest.assembler is not None
    rest.assembler.produce(1)
    wait_for_rows(rest.file("async.h5"), 1)
    stopped = client.stop_writer()
    assert stopped["state"] == "READY"
    assert (
        stopped["acquisition"]["state"] == "FINISHED" and stopped["acquisition"]["message"] == "Interrupted."
    )
    assert stopped["acquisition"]["stats"]["n_write_completed"] == 1
    assert client.get_logs(1)[0]["message"] == "Interrupted."
    assert client.stop_writer()["state"] == "READY"  # nothing to stop is fine


def test_std_daq_client_errors_raise_its_exception(rest: RestHarness, tmp_path: Path) -> None:
    client = StdDaqClient(url_base=rest.url)
    with pytest.raises(StdDaqAdminException, match="n_images: missing"):
        client.start_writer_async({"output_file": rest.file("x.h5")})
    with pytest.raises(StdDaqAdminException, match="n_images: Input should be greater than or equal to 1"):
        client.start_writer_sync({"n_images": 0, "output_file": rest.file("x.h5")})
    with pytest.raises(StdDaqAdminException, match="is outside the folders this DAQ writes to"):
        client.start_writer_sync({"n_images": 1, "output_file": str(tmp_path / "x.h5")})
    with pytest.raises(StdDaqAdminException, match="unknown config field"):
        client.set_config({"bit_dept": 32})
    r = requests.post(rest.url + "/writer/write_async", data=b"{oops", timeout=WAIT_S)
    assert r.status_code == 200 and r.json()["status"] == "error" and "malformed JSON" in r.json()["message"]
    r = requests.get(rest.url + "/daq/logs/-1", timeout=WAIT_S)
    assert r.status_code == 200 and r.json()["status"] == "error" and "n_logs" in r.json()["message"]
    assert client.get_status()["state"] == "READY"


def test_std_daq_client_partial_config_update_keeps_other_fields(ipc_env: str, tmp_path: Path) -> None:
    """Fields not given (or given as null) keep their values. A change is taken only once applied:
    here by a stand-in for the supervisor (``tests/fault/test_config_apply.py`` has the real one)."""
    config_path = tmp_path / "detector.json"
    applied_configs: list[Any] = []

    def apply(config: Any) -> str:
        applied_configs.append(config)
        return "the config is live (applied by the test)"

    harness = RestHarness(tmp_path, config_path=config_path, on_config_change=apply)
    try:
        client = StdDaqClient(url_base=harness.url)
        before = client.get_config()
        assert before == harness.config.to_json_dict()
        first_id = client.get_deployment_status()["config_id"]
        applied = client.set_config(
            {"module_sync_timeout": 2.5, "image_pixel_width": None, "writer_user_id": None}
        )
        assert applied == {**before, "module_sync_timeout": 2.5}
        assert client.get_config() == applied
        assert [c.to_json_dict() for c in applied_configs] == [applied]
        assert json.loads(config_path.read_text()) == applied
        deployment = client.get_deployment_status()
        assert deployment["status"] == "SUCCESS" and deployment["config_id"] != first_id
        assert set(deployment["servers"].values()) == {"Done"}
        assert deployment["stats"]["start_time"] <= deployment["stats"]["stop_time"]
        with pytest.raises(StdDaqAdminException, match="bit_depth: jungfrau sends 16-bit pixels"):
            client.set_config({"bit_depth": 32})
        with pytest.raises(StdDaqAdminException, match="detector_name cannot change"):
            client.set_config({"detector_name": "other"})
        assert client.get_config() == applied  # a refused change changes nothing
        assert client.get_deployment_status()["config_id"] == deployment["config_id"]
        assert len(applied_configs) == 1
    finally:
        harness.close()


def test_a_config_change_nothing_can_apply_is_refused(rest: RestHarness) -> None:
    """No supervisor runs this API's DAQ: the change cannot take effect, so it is not taken."""
    before = rest.http.get("/daq/config").json()["config"]
    answer = rest.http.post("/daq/config", json={"udp_host": "0.0.0.0"})
    assert answer.status_code == 200 and answer.json()["status"] == "error"  # the admin interface's way
    assert "config not applied" in answer.json()["message"]
    assert rest.http.get("/daq/config").json()["config"] == before
    answer = rest.http.post(f"/detector/{rest.config.detector_name}", json={"config": {"frames": 3}})
    assert answer.status_code == 200  # detector settings that leave the DAQ's config alone still work


def test_config_change_refused_while_writing(ipc_env: str, tmp_path: Path) -> None:
    rest = RestHarness(tmp_path, on_config_change=lambda config: "the config is live (applied by the test)")
    try:
        client = StdDaqClient(url_base=rest.url)
        client.start_writer_async({"n_images": 10, "output_file": rest.file("w.h5")})
        with pytest.raises(StdDaqAdminException, match="while a write request is running"):
            client.set_config({"module_sync_timeout": 3.0})
        client.stop_writer()
        assert client.set_config({"module_sync_timeout": 3.0})["module_sync_timeout"] == 3.0
    finally:
        rest.close()


class WriterProcess:
    """The writer agent + h5 writer in a process of their own, so a test can kill it like a crash."""

    def __init__(self, harness: RestHarness) -> None:
        config_path = harness.tmp_path / "writer-config.json"
        config_path.write_text(json.dumps(harness.config.to_json_dict()))
        code = "import sys; from daq_backend.writer.agent import writer_agent_main as m; sys.exit(m(sys.argv[1:]))"  # noqa: E501
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(config_path), "--broker-url", f"embedded://{harness.hub.name}",
             "--with-h5-writer", "--log-level", "WARNING"],
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip

    def crash(self) -> None:
        self.proc.kill()
        self.proc.wait(WAIT_S)


@pytest.fixture
def dead_writer_daq(ipc_env: str, tmp_path: Path) -> Iterator[tuple[RestHarness, str]]:
    """A DAQ whose writer died (SIGKILL) while writing: no final status will ever come."""
    harness = RestHarness(tmp_path, writer=False, kill_timeout=1.0)
    writer = WriterProcess(harness)
    try:
        wait_for(
            lambda: (
                post(harness, "/write_async", {"n_images": 10, "output_file": harness.file("dead.h5")}).ok
            ),
            "the writer process to serve requests",
            WAIT_S,
        )
        request_id = harness.backend.tracker.active()[0].request_id
        harness.wait_writing(request_id)
        writer.crash()
        yield harness, request_id
    finally:
        writer.crash()
        harness.close()


def test_admin_stop_resets_a_writer_that_died(dead_writer_daq: tuple[RestHarness, str]) -> None:
    """REST v2's stop also reset a writer that stopped answering; so does this one."""
    harness, _ = dead_writer_daq
    client = StdDaqClient(url_base=harness.url)
    assert client.get_status()["state"] == "WRITING"
    status = client.stop_writer()
    assert status["state"] == "READY" and status["acquisition"]["state"] == "FAILED"
    assert "no final status" in status["acquisition"]["message"]


def test_kill_of_a_request_whose_writer_died_is_504_and_the_api_stays_up(
    dead_writer_daq: tuple[RestHarness, str],
) -> None:
    harness, request_id = dead_writer_daq
    r = harness.http.post("/write_kill", json={"request_id": request_id})
    assert r.status_code == 504 and r.json()["request_id"] == request_id
    assert "did not end within 1 s of the kill" in r.json()["detail"]
    r = harness.http.post(f"/requests/{request_id}/stop")
    assert r.status_code == 202 and r.json()["state"] == "running"
    assert harness.http.get("/health").status_code == 200


# -- EPICS writer requests ------------------------------------------------------------------------


def test_epics_write_requests_through_the_api(rest: RestHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    from daq_backend.epics.service import EpicsWriterService
    from daq_backend.epics.store import make_store
    from daq_backend.epics.writer import WriterSettings
    from daq_backend.testing.epics import fill_buffer

    body = {"start_pulse_id": 1450, "stop_pulse_id": 1650, "channels": ["FLOAT", "TEXT"]}
    r = post(rest, "/epics/write_async", {**body, "output_file": rest.file("epics.h5")})
    assert r.status_code == 503 and "no EPICS writer is listening on tag 'epics_writer'" in r.json()["detail"]
    r = post(rest, "/epics/write_async", {**body, "stop_pulse_id": 1, "output_file": rest.file("epics.h5")})
    assert r.status_code == 422 and "stop_pulse_id" in r.json()["detail"]
    r = post(rest, "/epics/write_async", {**body, "output_file": "/etc/epics.h5"})
    assert r.status_code == 403

    monkeypatch.delenv("REDIS_HOST", raising=False)
    with make_store(None) as store:
        fill_buffer(store, "")
        service = EpicsWriterService(rest.transport, store, settings=WriterSettings(stop_wait_s=60))
        service.start()
        try:
            r = post(rest, "/epics/write_async", {**body, "output_file": rest.file("epics.h5")})
            assert r.status_code == 200, r.text
            done = rest.wait_state(r.json()["request_id"], "completed", "failed", "interrupted")
        finally:
            service.stop()
    assert done["state"] == "completed", done
    assert done["kind"] == "epics" and done["output_file"] == rest.file("epics.h5")
    assert set(done["result"]["datasets"]) == {"FLOAT", "TEXT"}
    with h5py.File(rest.file("epics.h5"), "r") as h5:
        assert h5  # a real file
    # EPICS requests are not the detector writer's: the admin state and logs ignore them
    client = StdDaqClient(rest.url)
    assert client.get_status()["state"] == "READY" and client.get_logs(10) == []


def test_stop_with_finish_ends_an_open_ended_request_as_completed(rest: RestHarness) -> None:
    assert rest.assembler is not None
    request_id = post(rest, "/write_async", {"n_images": 1000, "output_file": rest.file("open.h5")}).json()[
        "request_id"
    ]
    rest.wait_writing(request_id)
    for image_id in range(1, 4):
        rest.assembler.produce(image_id)
    wait_for_rows(rest.file("open.h5"), 3)
    r = rest.http.post(f"/requests/{request_id}/stop", params={"mode": "finish"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "completed" and r.json()["n_written"] == 3
    ids, _, attrs = read_file(rest.file("open.h5"))
    assert list(ids) == [1, 2, 3] and attrs["status"] == "completed"
    assert rest.http.post(f"/requests/{request_id}/stop", params={"mode": "later"}).status_code == 422
