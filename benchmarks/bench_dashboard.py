"""What watching the live dashboard costs the data path: one acquisition with no viewer, one with
``--viewers`` (default 2) viewers on ``/ui/events``, alternated ``--repeats`` times.

Each run is the production setup, fresh: ``std-daq up CONFIG`` (receiver, synchroniser/assembler,
writer and REST API, one process each under the supervisor, embedded broker) and the built-in UDP
simulator (``std-daq simulate``, its own process) sending ``--images`` 1-module Jungfrau images (1 MiB)
at ``--rate`` Hz over loopback. A write request for those images goes through the REST API and is
started before the first image is sent, so every image sent is requested. A viewer reads the event
stream the way the page does: it parses every snapshot and decodes every image (JSON + base64), in a
thread of this process; two viewers mean two connections the REST process serves.

Per run, from the first image sent to the request's end:

* lost frames: images requested minus good rows of distinct ids in the file (read from the file,
  not from the pipeline's claims), and the pipeline's own loss counters (``GET /stats``: packets lost,
  images with missing packets);
* CPU per image of the pipeline processes (receiver + assembler + writer, ``psutil`` user + system
  time sampled every 50 ms, ``_procmon``) divided by the images written, and the REST process' CPU
  (where the dashboard's work runs) as a share of one core;
* what the viewers received (snapshots and images), so a "with viewers" run is known to have served them.

The machine-wide busy CPU is recorded too: on a shared machine the difference between the two modes
is only meaningful when it exceeds the spread between repeats of the same mode.
Output: ``benchmarks/out/bench_dashboard.{json,md}``; ``--record`` also writes
``benchmarks/records/bench_dashboard.json`` and regenerates ``RESULTS.md`` and the README table.

    python benchmarks/bench_dashboard.py                    # 2 x (0 and 2 viewers), 2000 images @ 100 Hz
    python benchmarks/bench_dashboard.py --quick            # a smoke run: 1 x, 60 images @ 30 Hz
    python benchmarks/bench_dashboard.py --repeats 3 --rate 200 --images 4000 --record
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import httpx
import numpy as np
import psutil
from _net import free_udp_base
from _procmon import ProcessMonitor

from daq_backend import ipc
from daq_backend.config import parse_config
from daq_backend.supervisor import read_status
from daq_backend.writer import layout

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
CLI = (sys.executable, "-m", "daq_backend.cli")
PIPELINE = ("receiver", "assembler", "h5-writer", "writer-agent")
WAIT_S = 120.0


class BenchError(RuntimeError):
    """A run could not be made; the message says which step failed."""


@dataclass
class RunResult:
    mode: str  # "no viewer" | "N viewers"
    viewers: int
    repeat: int
    images: int
    rate_hz: float
    written: int
    good: int
    lost_frames: int
    packets_lost: int
    images_missing_packets: int
    seconds: float
    cpu_s: dict[str, float]
    rest_cpu_s: float
    machine_cpu_s: float
    snapshots_received: list[int] = field(default_factory=list)
    images_received: list[int] = field(default_factory=list)

    @property
    def pipeline_cpu_ms_per_image(self) -> float:
        return 1000.0 * sum(self.cpu_s.values()) / max(1, self.written)

    @property
    def rest_core_share(self) -> float:
        return self.rest_cpu_s / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pipeline_cpu_ms_per_image"] = round(self.pipeline_cpu_ms_per_image, 4)
        data["rest_core_share"] = round(self.rest_core_share, 4)
        return data


class Viewer:
    """Reads ``/ui/events`` like the page: every snapshot parsed, every image decoded."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.snapshots = 0
        self.images = 0
        self.error: str | None = None
        self._client = httpx.Client(timeout=httpx.Timeout(30.0, read=60.0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="viewer", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        event, data = "message", []
        try:
            with self._client.stream("GET", f"{self.url}/ui/events") as response:
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                    elif not line and data:
                        payload = json.loads("\n".join(data))
                        if event == "image":
                            base64.b64decode(payload["png"])
                            self.images += 1
                        elif event == "snapshot":
                            self.snapshots += 1
                        event, data = "message", []
        except httpx.HTTPError as exc:
            if not self._stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        self._stop.set()
        self._client.close()
        self._thread.join(10)


class Daq:
    """``std-daq up`` of a fresh detector in a private ipc directory; its output goes to a log file."""

    def __init__(self, workdir: Path, ring_slots: int) -> None:
        self.ipc_dir = tempfile.mkdtemp(prefix="sdqb", dir="/tmp")
        name = f"bd{uuid.uuid4().hex[:8]}"
        self.config = parse_config({
            "detector_name": name, "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
            "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": free_udp_base(1),
            "frame_ring_slots": ring_slots, "image_ring_slots": ring_slots,
        })
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(self.config.to_json_dict()))
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        os.environ["STD_DAQ_IPC_DIR"] = self.ipc_dir  # this process reads the run's status file too
        self.env = dict(os.environ)
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*CLI, "up", str(self.config_path), "--rest-port", str(self.port), "--log-level", "WARNING",
             "--output-root", str(workdir)],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pids: dict[str, int] = {}

    def wait_up(self) -> None:
        status = ipc.status_file(self.config.detector_name)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"std-daq up exited with {self.proc.returncode}: {self.tail()}")
            try:
                services = read_status(status)["services"] if os.path.exists(status) else []
                if services and all(s["alive"] for s in services):
                    if httpx.get(f"{self.url}/stats", timeout=10).json()["pipeline"] == "up":
                        self.pids = {s["name"]: s["pid"] for s in services}
                        return
            except (OSError, ValueError, httpx.HTTPError, KeyError):
                pass
            time.sleep(0.2)
        raise BenchError(f"the pipeline did not come up in {WAIT_S} s: {self.tail()}")

    def tail(self, n: int = 20) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
        self.config_path.unlink(missing_ok=True)
        for entry in Path(self.ipc_dir).iterdir():
            entry.unlink(missing_ok=True)
        os.rmdir(self.ipc_dir)


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def good_images(path: Path) -> tuple[int, int]:
    """(rows written, distinct image ids written with status good), read from the file itself."""
    with h5py.File(path, "r") as h5:
        n = layout.written_rows(h5)
        ids = h5[layout.IMAGE_ID][:n]
        status = h5[layout.STATUS][:n]
    return int(n), int(np.unique(ids[status == 0]).size)


def one_run(args: argparse.Namespace, viewers: int, repeat: int, workdir: Path) -> RunResult:
    daq = Daq(workdir, args.ring_slots)
    clients: list[Viewer] = []
    monitor = ProcessMonitor(interval=0.05)
    output = workdir / f"{daq.config.detector_name}.h5"
    try:
        daq.wait_up()
        clients = [Viewer(daq.url) for _ in range(viewers)]
        deadline = time.monotonic() + WAIT_S
        while any(c.snapshots == 0 for c in clients):
            if time.monotonic() > deadline or any(c.error for c in clients):
                raise BenchError(f"viewers got no snapshot: {[c.error for c in clients]}")
            time.sleep(0.05)
        for name, pid in daq.pids.items():
            monitor.add(name, pid)
        monitor.start()
        http = httpx.Client(base_url=daq.url, timeout=60)
        answer = http.post("/write_async", json={"output_file": str(output), "n_images": args.images,
                                                 "timeout": 20})
        if answer.status_code != 200:
            raise BenchError(f"write request refused: {answer.text}")
        request_id = answer.json()["request_id"]
        while http.get(f"/requests/{request_id}").json()["state"] == "queued":
            if time.monotonic() > deadline:
                raise BenchError("the writer did not start the request")
            time.sleep(0.05)
        start = monitor.sample()
        sender = subprocess.Popen([*CLI, "simulate", str(daq.config_path), "--rate", str(args.rate),
                                   "--n-images", str(args.images), "--no-progress"], env=daq.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        limit = time.monotonic() + args.images / args.rate + WAIT_S
        while (record := http.get(f"/requests/{request_id}").json())["state"] not in (
                "completed", "interrupted", "failed"):
            if time.monotonic() > limit:
                raise BenchError(f"the request did not end: {record}")
            time.sleep(0.1)
        end = monitor.sample()
        sender.wait(60)
        stats = http.get("/stats").json()
        http.close()
        written, good = good_images(output)
        usage = {name: monitor.usage(name, start, end) for name in daq.pids}
        cpu = {name: round(u.cpu_s, 4) for name, u in usage.items()
               if u is not None and name.startswith(PIPELINE)}
        rest = usage.get("rest")
        return RunResult(
            mode="no viewer" if viewers == 0 else f"{viewers} viewers", viewers=viewers, repeat=repeat,
            images=args.images, rate_hz=args.rate, written=written, good=good,
            lost_frames=args.images - good, packets_lost=int(stats["lost"]["packets"]),
            images_missing_packets=int(stats["lost"]["images_missing_packets"]),
            seconds=round(end - start, 3),
            cpu_s=cpu, rest_cpu_s=round(rest.cpu_s, 4) if rest else float("nan"),
            machine_cpu_s=round(monitor.machine_cpu(start, end), 3),
            snapshots_received=[c.snapshots for c in clients], images_received=[c.images for c in clients],
        )
    finally:
        monitor.stop()
        for client in clients:
            client.close()
        daq.stop()
        output.unlink(missing_ok=True)


# -- report ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "nproc": os.cpu_count(), "kernel": platform.release(),
        "python": sys.version.split()[0], "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def render_markdown(doc: dict[str, Any]) -> str:
    runs = [RunResult(**{k: v for k, v in r.items() if k in RunResult.__dataclass_fields__})
            for r in doc["runs"]]
    facts = doc["machine"]
    lines = [f"## Dashboard cost {facts['date']}", "", f"Command: `{doc['command']}`", "",
             f"Machine: {facts['nproc']} cores, load average at start {facts['loadavg_start']}, "
             f"{facts['host']}. Shared machine: the numbers are indicative.", "",
             "| viewers | runs | lost frames | packets lost | pipeline CPU ms/image "
             "| REST CPU (share of a core) | machine busy cores | snapshots / images per viewer |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in dict.fromkeys(r.mode for r in runs):
        group = [r for r in runs if r.mode == mode]
        received = ", ".join(f"{s}/{i}" for r in group for s, i in
                             zip(r.snapshots_received, r.images_received, strict=True)) or "–"
        lines.append(
            f"| {mode} | {len(group)} | {sum(r.lost_frames for r in group)} of "
            f"{sum(r.images for r in group)} | {sum(r.packets_lost for r in group)} | "
            f"{_spread([r.pipeline_cpu_ms_per_image for r in group], 3)} | "
            f"{_spread([r.rest_core_share for r in group], 3)} | "
            f"{_spread([r.machine_cpu_s / r.seconds for r in group], 2)} | {received} |")
    lines += ["", "Per process (CPU seconds during the acquisition, each run):", "",
              "| run | " + " | ".join(PIPELINE) + " | rest | seconds |", "|---" * (len(PIPELINE) + 3) + "|"]
    for r in runs:
        per = [sum(v for k, v in r.cpu_s.items() if k.startswith(p)) for p in PIPELINE]
        lines.append(f"| {r.mode} #{r.repeat} | " + " | ".join(f"{v:.3f}" for v in per)
                     + f" | {r.rest_cpu_s:.3f} | {r.seconds:.1f} |")
    lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_dashboard.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, 60 images at 30 Hz")
    p.add_argument("--images", type=int, default=2000, help="images per run (default 2000)")
    p.add_argument("--rate", type=float, default=100.0, help="images per second (default 100)")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode, alternated (default 2)")
    p.add_argument("--viewers", type=int, default=2, help="viewers of the second mode (default 2)")
    p.add_argument("--ring-slots", type=int, default=256, help="frame and image ring slots (default 256)")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm"), help="where the HDF5 file goes")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default benchmarks/out)")
    p.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    p.add_argument("--record", action="store_true",
                   help="also write benchmarks/records/bench_dashboard.json and regenerate RESULTS.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.images, args.rate, args.repeats = 60, 30.0, 1
    if args.images < 1 or args.rate <= 0 or args.repeats < 1 or args.viewers < 1:
        print("bench_dashboard: --images, --rate, --repeats and --viewers must be positive", file=sys.stderr)
        return 2
    from _records import Record, machine_info, record_and_report

    started = machine_info()
    command = "python benchmarks/bench_dashboard.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    doc: dict[str, Any] = {"schema": "std-daq-bench-dashboard/1", "command": command.strip(),
                           "machine": machine(), "runs": []}
    workdir = Path(tempfile.mkdtemp(prefix="bench-dashboard-", dir=args.workdir))
    try:
        for repeat in range(1, args.repeats + 1):
            for viewers in (0, args.viewers):
                result = one_run(args, viewers, repeat, workdir)
                doc["runs"].append(result.to_dict())
                print(f"{result.mode} #{repeat}: lost {result.lost_frames}/{result.images}, pipeline "
                      f"{result.pipeline_cpu_ms_per_image:.3f} CPU ms/image, REST "
                      f"{result.rest_core_share:.3f} of a core", file=sys.stderr)
    except BenchError as exc:
        print(f"bench_dashboard: {exc}", file=sys.stderr)
        return 1
    finally:
        for leftover in workdir.iterdir():
            leftover.unlink(missing_ok=True)
        workdir.rmdir()
    markdown = render_markdown(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_dashboard.json").write_text(json.dumps(doc, indent=1))
    (args.out / "bench_dashboard.md").write_text(markdown)
    print(markdown)
    if args.record:
        record_and_report(Record("bench_dashboard", doc["command"], notes=args.note, raw=doc), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
