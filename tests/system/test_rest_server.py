"""Serving the API: the command line (``python -m daq_backend.rest.server``), the uvicorn thread, the
supervisor's process entry, and the seed README's examples run verbatim on 127.0.0.1:5000."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi import FastAPI

from daq_backend.broker.embedded_hub import hub_is_running
from daq_backend.config import DetectorConfig
from daq_backend.rest.server import RestServer, rest_main
from daq_backend.supervisor import Supervisor
from daq_backend.testing import free_tcp_port, healthy, make_config, wait_for
from daq_backend.topology import Topology

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120.0
SEED_RESPONSE_KEYS = {"output_file", "status", "init_timestamp", "end_timestamp"}
DETECTOR_KEYS = {
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


def write_config(tmp_path: Path, config: DetectorConfig) -> Path:
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    return path


def test_server_picks_a_free_port_and_refuses_a_busy_one() -> None:
    app = FastAPI()
    app.get("/ping")(lambda: {"pong": True})
    with RestServer(app, port=0) as server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert requests.get(f"{server.url}/ping", timeout=WAIT_S).json() == {"pong": True}
        with pytest.raises(OSError, match=f"REST API cannot listen on 127.0.0.1:{server.port}"):
            RestServer(app, port=server.port).start()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/ping", timeout=5)


def test_rest_main_serves_starts_its_broker_hub_and_stops_on_sigterm(ipc_env: str, tmp_path: Path) -> None:
    config = make_config("jungfrau")
    hub = f"rm-{uuid.uuid4().hex[:8]}"
    port = free_tcp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daq_backend.cli", "rest", str(write_config(tmp_path, config)),
         "--rest-port", str(port), "--broker-url", f"embedded://{hub}", "--alias", "JF1M",
         "--output-root", str(tmp_path)],
        cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url) or proc.poll() is not None, "the REST process", WAIT_S)
        assert proc.poll() is None
        assert hub_is_running(hub)  # no hub was running: the API started one
        health = requests.get(f"{url}/health", timeout=WAIT_S).json()
        assert health["detector_name"] == config.detector_name and health["pipeline"] == "down"
        for name in (config.detector_name, "jungfrau", "jf1m"):
            assert set(requests.get(f"{url}/detector/{name}", timeout=WAIT_S).json()) == DETECTOR_KEYS
        r = requests.post(
            f"{url}/write_async", json={"n_images": 1, "output_file": "/etc/x.h5"}, timeout=WAIT_S
        )
        assert r.status_code == 403
        r = requests.post(f"{url}/write_async", json={"n_images": 1, "output_file": str(tmp_path / "x.h5")})
        assert r.status_code == 503 and "no writer agent" in r.json()["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(WAIT_S)
    assert code == 0
    assert not hub_is_running(hub)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rest-port", "{busy}"], "REST API cannot listen on 127.0.0.1:{busy}"),
        (["--detector-control", "sls"], "--detector-host is required"),
    ],
)
def test_rest_main_start_errors_are_reported(
    ipc_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        argv = [a.replace("{busy}", port) for a in argv]
        hub = f"re-{uuid.uuid4().hex[:8]}"
        path = write_config(tmp_path, make_config("jungfrau"))
        code = rest_main([str(path), "--broker-url", f"embedded://{hub}", *argv])
    assert code == 2
    assert message.replace("{busy}", port) in capsys.readouterr().err
    assert not hub_is_running(hub)  # the hub it started was stopped again


def test_rest_main_bad_config_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"detector_name": "x", "detector_type": "jungfrau"}))
    assert rest_main([str(path)]) == 2
    assert "n_modules" in capsys.readouterr().err


def test_supervisor_runs_the_api_as_a_service(ipc_env: str, tmp_path: Path) -> None:
    """``std-daq up CONFIG --rest-port PORT``: the API is one supervised process; its /stats read the
    supervisor's status file, which lists the API itself."""
    config = make_config("jungfrau")
    path = write_config(tmp_path, config)
    hub = f"sv-{uuid.uuid4().hex[:8]}"
    port = free_tcp_port()
    topology = Topology(config, path, f"embedded://{hub}", readout_processes=False, writer=False,
                        rest_port=port)
    spec, = topology.services()
    assert spec.name == "rest" and spec.argv[3:8] == ("rest", str(path), "--rest-port", str(port), "--host")
    assert spec.argv[-2:] == ("--broker-url", f"embedded://{hub}")
    supervisor = Supervisor(config, path, topology=topology, status_interval=0.2)
    url = f"http://127.0.0.1:{port}"
    supervisor.start()
    try:

        def api_sees_itself() -> dict[str, Any] | None:
            supervisor.poll_once()
            if not healthy(url):
                return None
            stats = requests.get(f"{url}/stats", timeout=WAIT_S).json()
            return stats if "rest" in stats["processes"] else None

        stats = wait_for(api_sees_itself, "the supervised API", WAIT_S)
        assert stats["pipeline"] == "up"
        assert stats["processes"]["rest"]["alive"] is True
        assert stats["processes"]["rest"]["pid"] == supervisor.pids()["rest"]
    finally:
        supervisor.shutdown()
    assert not healthy(url)


def test_readme_examples_verbatim(tmp_path: Path) -> None:
    """Every example of the seed README's REST section, as written: ``requests`` and ``curl`` against
    ``http://127.0.0.1:5000``, files in ``/tmp/test.h5``. Private mount, network and pid namespaces
    give the run its own 127.0.0.1:5000, /tmp and /dev/shm (nothing leaks; nothing is left behind)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STD_DAQ_", "BROKER_"))}
    # A checkout or venv under /tmp (e.g. CI's clone) stays visible: the old /tmp is kept under /mnt
    # and those folders are bind-mounted back into the private /tmp.
    keep = sorted({str(p) for p in (Path(REPO).resolve(), Path(sys.prefix).resolve())
                   if p.is_relative_to("/tmp")})
    rebind = "".join(f" && mkdir -p {shlex.quote(p)} && mount --bind /mnt/host-tmp/"
                     f"{shlex.quote(str(Path(p).relative_to('/tmp')))} {shlex.quote(p)}" for p in keep)
    script = (
        "ip link set lo up && mount -t tmpfs tmpfs /mnt && mkdir /mnt/host-tmp "
        "&& mount --bind /tmp /mnt/host-tmp && mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm"
        f'{rebind} && exec "$0" -m tests.system.rest_readme_scenario'
    )
    command = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--propagation", "private",
               "sh", "-c", script, sys.executable]  # fmt: skip
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith('{"example"'):
            item = json.loads(line)
            results[item["example"]] = (item["status"], item["body"])
    assert len(results) == 9, out.stdout + out.stderr[-5000:]

    for example in ("write_sync python", "write_sync curl"):
        status, body = results[example]
        assert status == 200, body
        assert set(body) == {"request_id", "response"} and SEED_RESPONSE_KEYS <= set(body["response"])
        assert body["response"]["status"] == "request_success"
        assert body["response"]["output_file"] == "/tmp/test.h5"
        assert body["response"]["end_timestamp"] > body["response"]["init_timestamp"]
    assert results["write_sync python"][1]["response"]["n_written"] == 10
    assert results["write_sync curl"][1]["response"]["n_written"] == 5
    for example in ("write_async python", "write_async curl"):
        status, body = results[example]
        assert status == 200 and set(body) == {"request_id", "output_file"} and uuid.UUID(body["request_id"])
        assert body["output_file"] == "/tmp/test.h5"  # the answer names its own file

    status, body = results["write_kill python"]
    assert status == 200 and set(body) == {"request_id", "response"}
    assert SEED_RESPONSE_KEYS <= set(body["response"])
    # 10 images at 2 Hz, killed after 3 s: interrupted (the seed called a kill a success, weakness 3)
    assert body["response"]["state"] == "interrupted" and body["response"]["status"] == "request_fail"
    assert 0 < body["response"]["n_written"] < 10

    # dr=32 would change the DAQ's bit_depth, and this API (no supervisor) cannot apply that: refused
    # with the reason, the detector kept at its dr, instead of a file rewritten without effect
    status, body = results["detector set"]
    assert status == 409 and body["response"].startswith("dr=32 not applied, the detector keeps dr=16")
    status, body = results["detector set unknown"]
    assert status == 400 and body["response"] == "Parameter not valid: FOO"
    status, body = results["detector get"]
    assert status == 200 and set(body) == DETECTOR_KEYS
    assert body["det_name"] == "eiger" and body["frames"] == 5 and body["dr"] == 16
    assert body["timing"] == "timingMode.AUTO_TIMING" and body["speed"] == "speedLevel.FULL_SPEED"
    assert results["rest exit"] == (0, None)
