"""The dashboard in a real browser during a real acquisition: ``std-daq up`` (separate processes), the
built-in UDP simulator with a dropped packet, a write request, and Debian's Chromium (headless, driven by
Playwright; no browser download). The numbers on the page are the ones ``GET /stats`` answers for the
same status update, the image changes while images arrive, the request's progress matches
``GET /requests/{id}``, a killed receiver shows up as restarted with the supervisor's log line, and
screenshots are saved in the test's tmp dir."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Page, sync_playwright

from daq_backend import ipc
from daq_backend.supervisor import read_status
from daq_backend.testing import assert_no_leftovers, free_tcp_port, make_config, pid_alive, wait_for

CLI = (sys.executable, "-m", "daq_backend.cli")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_S = 120.0  # two shared cores: generous
N_IMAGES = 150
RATE_HZ = 20
DROPPED = "12:0:5"  # image 12, module 0, packet 5 never leaves the simulator

#: what the page shows, read from the data attributes next to the formatted numbers
READ_PAGE = """() => {
  const values = {};
  for (const node of document.querySelectorAll("[data-key]")) values[node.dataset.key] = node.dataset.value;
  const img = document.getElementById("image");
  const rows = {};
  for (const row of document.querySelectorAll("#processes tr")) {
    rows[row.dataset.process] = {state: row.dataset.state, restarts: Number(row.dataset.restarts)};
  }
  return {
    seq: document.body.dataset.seq || null,
    updated: document.getElementById("freshness").dataset.updated || null,
    pipeline: document.getElementById("pipeline").dataset.value,
    values,
    texts: Object.fromEntries([...document.querySelectorAll(".tile [data-key]")].map(
      (n) => [n.dataset.key, n.textContent])),
    image: {id: img.dataset.imageId, seq: img.dataset.seq, status: img.dataset.status,
            badge: document.getElementById("image-status").textContent,
            loaded: img.complete && img.naturalWidth},
    request: document.getElementById("request-state").dataset.value || null,
    processes: rows,
    problems: [...document.querySelectorAll("#problems li")].map((li) => li.textContent),
    logs: [...document.querySelectorAll("#logs .log")].map((row) => row.textContent),
    live: document.getElementById("connection").dataset.live,
  };
}"""


def poll(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """``wait_for`` at a slower pace: page reads are not free (every 0.2 s)."""
    return wait_for(predicate, what, timeout, interval=0.2)


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}", inner))
        return out
    return {prefix: value}


class Daq:
    """``std-daq up`` of one detector with its REST API, and the simulator feeding it."""

    def __init__(self, tmp_path: Path, ipc_dir: str) -> None:
        self.config = make_config("jungfrau", frame_ring_slots=64, image_ring_slots=64)
        self.path = tmp_path / "detector.json"
        self.path.write_text(json.dumps(self.config.to_json_dict()))
        self.url = f"http://127.0.0.1:{free_tcp_port()}"
        self.env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_dir)
        self.log = open(tmp_path / "up.log", "wb")  # closed in stop()
        port = self.url.rsplit(":", 1)[1]
        self.up = subprocess.Popen(
            [*CLI, "up", str(self.path), "--rest-port", port, "--status-interval", "0.5"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.sender: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    def wait_up(self) -> None:
        status_path = ipc.status_file(self.config.detector_name)

        def up() -> bool:
            if self.up.poll() is not None:
                raise AssertionError(f"std-daq up exited with {self.up.returncode}")
            if not os.path.exists(status_path):
                return False
            services = read_status(status_path)["services"]
            self.pids = [s["pid"] for s in services]
            names = {s["name"] for s in services}
            return names == expected and all(s["alive"] for s in services)

        expected = {*(f"receiver-{m}" for m in self.config.required_modules),
                    "assembler", "h5-writer", "writer-agent", "rest"}
        poll(up, "receivers, assembler, h5 writer, writer agent and rest alive")
        poll(lambda: self._get("/stats").get("pipeline") == "up", "the REST API to see the pipeline")

    def _get(self, path: str) -> dict[str, Any]:
        try:
            return requests.get(self.url + path, timeout=30).json()
        except (requests.RequestException, ValueError):
            return {}

    def simulate(self) -> None:
        self.sender = subprocess.Popen(
            [*CLI, "simulate", str(self.path), "--rate", str(RATE_HZ), "--n-images", "1000000",
             "--no-progress", "--drop-packet", DROPPED], env=self.env, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.sender is not None:
            self.sender.kill()
            self.sender.wait(30)
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGINT)
        code = self.up.wait(60)
        self.log.close()
        assert code == 0, f"std-daq up exited with {code}"


@pytest.fixture
def daq(ipc_env: str, tmp_path: Path) -> Iterator[Daq]:
    daq = Daq(tmp_path, ipc_env)
    try:
        daq.wait_up()
        yield daq
    finally:
        daq.stop()
    assert not any(pid_alive(p) for p in daq.pids)
    assert_no_leftovers(daq.config, ipc_env)


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium (Debian's package)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def read(page: Page) -> dict[str, Any]:
    return page.evaluate(READ_PAGE)


def test_dashboard_in_chromium_during_an_acquisition(daq: Daq, browser: Browser, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{daq.url}/ui")
    poll(lambda: read(page)["seq"] and read(page)["live"] == "1", "a first snapshot on the page")

    daq.simulate()
    output = tmp_path / "run.h5"
    answer = requests.post(f"{daq.url}/write_async", json={"output_file": str(output), "n_images": N_IMAGES},
                           timeout=60)
    assert answer.status_code == 200, answer.text
    request_id = answer.json()["request_id"]

    # the image: shown, with its status, and replaced by newer ones while images arrive
    first = poll(lambda: (shown := read(page)["image"])["id"] and shown["loaded"] and shown, "a first image")
    assert first["badge"].startswith(("good", "missing packets")), first
    second = poll(lambda: (shown := read(page)["image"])["id"] not in (None, first["id"]) and shown,
                  "the image to change")
    assert int(second["id"]) > int(first["id"]) and int(second["seq"]) > int(first["seq"])

    running = poll(lambda: (s := read(page))["request"] == "running" and float(
        s["values"]["request.n_written"] or 0) > 0 and s, "the request running on the page")
    assert running["pipeline"] == "up"
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    # the numbers: once the packet loss is counted, page and /stats agree for the same status update
    def same_update() -> tuple[dict[str, Any], dict[str, Any]] | None:
        shown = read(page)
        stats = daq._get("/stats")
        if not stats or stats.get("lost", {}).get("packets", 0) < 1 or shown["updated"] is None:
            return None
        if float(shown["updated"]) != stats["updated"]:
            return None  # the status file changed between the two reads: try again
        return shown, stats

    shown, stats = poll(same_update, "the page and /stats on the same status update (with the lost packet)")
    expected = flatten("stats", {k: stats[k] for k in ("detector", "writer", "receivers", "lost")})
    for name, process in stats["processes"].items():
        expected.update(flatten(f"processes.{name}.counters", process["counters"]))
    compared = [key for key in expected if key in shown["values"]]
    assert len(compared) >= 30, compared
    for key in compared:
        assert float(shown["values"][key]) == pytest.approx(float(expected[key]), rel=1e-12, abs=1e-12), key
    assert stats["lost"]["packets"] == 1 and stats["lost"]["images_missing_packets"] == 1
    assert shown["texts"]["stats.lost.packets"] == "1"
    packets_per_second = stats["receivers"]["packets_per_second"]
    assert packets_per_second >= 100  # shown as a whole number, rounded half up like Math.round
    assert shown["texts"]["stats.receivers.packets_per_second"] == f"{math.floor(packets_per_second + 0.5):,}"
    assert set(shown["processes"]) == {"receiver-0", "assembler", "h5-writer", "writer-agent", "rest"}
    assert all(p["state"] == "running" for p in shown["processes"].values())

    # the request: the page ends where GET /requests/{id} ends
    done = poll(lambda: (s := read(page))["request"] == "completed" and s, "the request completed (page)")
    record = requests.get(f"{daq.url}/requests/{request_id}", timeout=30).json()
    assert record["state"] == "completed"
    assert float(done["values"]["request.n_written"]) == record["n_written"] == N_IMAGES
    assert float(done["values"]["request.n_images"]) == N_IMAGES

    # health: a killed receiver is restarted; the page shows it, and the supervisor's log line
    receiver = next(s for s in read_status(ipc.status_file(daq.config.detector_name))["services"]
                    if s["name"] == "receiver-0")
    os.kill(receiver["pid"], signal.SIGKILL)
    restarted = poll(lambda: (s := read(page))["processes"]["receiver-0"]["restarts"] == 1
                     and s["processes"]["receiver-0"]["state"] == "running" and s, "the receiver restarted")
    assert "receiver-0 restarted 1×" in restarted["problems"]
    poll(lambda: any("receiver-0 exited with -9" in line for line in read(page)["logs"]),
         "the supervisor's line about it")
    page.screenshot(path=str(tmp_path / "dashboard-restart.png"), full_page=True)
    assert errors == []
