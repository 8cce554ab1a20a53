"""Readout benchmark (issue 2): simulator -> receiver + assembler (real processes) -> image ring.

Jungfrau, 1 module (1 MiB frames, 128 packets of 8240 bytes). Two figures, side by side:

1. **loopback limit**: the simulator sending as fast as it can to a port where a socket is bound but
   nothing reads (the kernel drops what does not fit) — the most this machine's loopback and this
   simulator can offer any receiver.
2. **highest zero-loss rate**: the supervisor starts the receiver and the synchroniser/assembler as
   production does (one process each); the simulator (its own process) sends ``duration`` seconds at
   a rate that steps up by ``factor`` until an image is lost or flagged, then bisects between the
   last clean and the first lossy rate (or stops where the simulator cannot send faster while the
   readout runs). An image counts when it arrived in the image ring, announced on the ImageMetadata
   stream, with status good; the rate reported is the one the simulator achieved.

For every step: CPU seconds per GB of each process (psutil, user+system, over the step), kernel
drops on the receiver's socket (``/proc/net/udp``) and the CPU other programs used meanwhile (the
machine is shared). Results go to ``benchmarks/out/bench_readout.json``.

    python benchmarks/bench_readout.py [--duration 10] [--start-rate 100] [--factor 1.5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq
from _net import free_udp_port, udp_drops
from _procmon import machine_busy_seconds

from daq_backend import ipc
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.detectors import layout_for
from daq_backend.formats import ImageMetadata, ImageStatus
from daq_backend.readout.receiver import default_receive_buffer, set_receive_buffer
from daq_backend.supervisor import Supervisor

OUT_DIR = Path(__file__).resolve().parent / "out"


# -- helpers -----------------------------------------------------------------------------------


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system








def _send(config_json: str, rate: float, n_images: int | None, start_id: int, duration: float,
          conn: Connection) -> None:
    """Simulator in its own process; reports what it achieved and the CPU it used."""
    from daq_backend.simulator.sender import DetectorSimulator

    config = DetectorConfig.model_validate_json(config_json)
    me = psutil.Process()
    with DetectorSimulator(config, rate_hz=rate, n_images=n_images, start_id=start_id) as sim:
        c0 = me.cpu_times()
        if n_images is None:
            sim.start()
            time.sleep(duration)
            sim.stop()
        else:
            sim.run()
        c1 = me.cpu_times()
        conn.send({"images": sim.n_sent_images, "packets": sim.n_sent_packets, "elapsed": sim.elapsed,
                   "rate": sim.achieved_rate, "cpu": (c1.user - c0.user) + (c1.system - c0.system),
                   "sendmmsg": sim.uses_sendmmsg})


def run_sender(config: DetectorConfig, rate: float, n_images: int | None, start_id: int = 1,
               duration: float = 0.0) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    args = (config.model_dump_json(), rate, n_images, start_id, duration, child)
    proc = ctx.Process(target=_send, args=args)
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


class MetadataCollector:
    """SUB on the assembler's ImageMetadata stream: status and missing packets per image id."""

    def __init__(self, detector_name: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sock.connect(ipc.image_metadata_address(detector_name))
        self.seen: dict[int, tuple[int, int]] = {}
        self.last_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(100):
                meta = ImageMetadata.unpack(self.sock.recv())
                self.seen[meta.id] = (meta.status, meta.n_missing_packets)
                self.last_id = meta.id

    def wait_for(self, image_id: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if image_id in self.seen:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


# -- the two measurements ------------------------------------------------------------------------


def loopback_limit(config: DetectorConfig, duration: float) -> dict[str, Any]:
    """The simulator at full speed into a bound socket nobody reads."""
    port = free_udp_port()
    cfg = config.model_copy(update={"start_udp_port": port})
    frame_bytes = layout_for(cfg).frame_nbytes
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as drain:
        drain.bind(("127.0.0.1", port))
        result = run_sender(cfg, 0.0, None, 1, duration)
    gb = result["images"] * frame_bytes / 1e9
    return {
        "images_per_s": result["rate"],
        "gb_per_s": result["rate"] * frame_bytes / 1e9,
        "sender_cpu_s_per_gb": result["cpu"] / gb if gb else None,
        "seconds": result["elapsed"],
        "sendmmsg": result["sendmmsg"],
    }


class ReadoutRig:
    """Receiver + assembler under the real supervisor (own processes), a SUB counting images."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.frame_bytes = layout_for(config).frame_nbytes
        self.supervisor = Supervisor(config, status_interval=0.5)
        self._thread = threading.Thread(target=self.supervisor.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 120
        while True:
            status = self.supervisor.status()["services"]
            if all(s["alive"] for s in status) and all(s["counters"] for s in status):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"readout processes did not come up: {status}")
            time.sleep(0.1)
        self.pids = {s["name"]: s["pid"] for s in status}
        self.collector = MetadataCollector(config.detector_name)
        self.next_id = 1

    def counters(self) -> dict[str, dict[str, int]]:
        return {s["name"]: dict(s["counters"]) for s in self.supervisor.status()["services"]}

    def warm_up(self) -> None:
        """A few images at a low rate, until the SUB provably receives (PUB drops before that)."""
        for _ in range(20):
            run_sender(self.config, 50.0, 10, self.next_id)
            self.next_id += 10
            if self.collector.wait_for(self.next_id - 1, 10.0):
                return
        raise RuntimeError("no ImageMetadata arrives from the assembler")

    def step(self, rate: float, duration: float) -> dict[str, Any]:
        n = max(10, int(rate * duration))
        first = self.next_id
        last = first + n - 1
        self.next_id = last + 1
        port = self.config.udp_port(0)
        cpu0 = {name: _cpu(pid) for name, pid in self.pids.items()}
        busy0, drops0, c0 = machine_busy_seconds(), udp_drops(port), self.counters()
        sent = run_sender(self.config, rate, n, first)
        self.collector.wait_for(last, self.config.module_sync_timeout + 5.0)
        time.sleep(1.0)  # let a final stats report of each process arrive
        cpu1 = {name: _cpu(pid) for name, pid in self.pids.items()}
        busy1, drops1, c1 = machine_busy_seconds(), udp_drops(port), self.counters()
        got = [self.collector.seen.get(i) for i in range(first, last + 1)]
        good = sum(1 for g in got if g is not None and g[0] == ImageStatus.GOOD)
        flagged = sum(1 for g in got if g is not None and g[0] != ImageStatus.GOOD)
        gb = n * self.frame_bytes / 1e9
        ours = sum(cpu1[k] - cpu0[k] for k in cpu0) + sent["cpu"]
        diff = {name: {k: c1[name].get(k, 0) - c0[name].get(k, 0) for k in c1[name] if k != "last_frame_id"
                       and k != "last_image_id" and k != "pending"} for name in c1}
        return {
            "rate_hz": rate,
            "images": n,
            "sent_rate_hz": sent["rate"],
            "sender_limited": sent["rate"] < 0.8 * rate,
            "good": good,
            "flagged": flagged,
            "missing": n - good - flagged,
            "lost": n - good,
            "gb_per_s": sent["rate"] * self.frame_bytes / 1e9,
            "cpu_s_per_gb": {**{k: (cpu1[k] - cpu0[k]) / gb for k in cpu0}, "simulator": sent["cpu"] / gb},
            "kernel_drops": drops1 - drops0,
            "other_programs_cpu_s": max(0.0, (busy1 - busy0) - ours),
            "counters": diff,
        }

    def close(self) -> None:
        self.collector.close()
        self.supervisor.stop()
        self._thread.join(60)


def machine_facts(config: DetectorConfig) -> dict[str, Any]:
    layout = layout_for(config)
    wanted = default_receive_buffer(layout.max_datagram, layout.packets_per_frame)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        granted = set_receive_buffer(s, wanted)
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "net.core.rmem_max": int(Path("/proc/sys/net/core/rmem_max").read_text()),
        "receiver_rcvbuf_asked": wanted,
        "receiver_rcvbuf_granted": granted,
        "root": os.geteuid() == 0,
        "loadavg_at_start": list(psutil.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate step (>= 10)")
    parser.add_argument("--start-rate", type=float, default=100.0)
    parser.add_argument("--factor", type=float, default=1.5, help="rate multiplier per step")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the first loss")
    parser.add_argument("--max-rate", type=float, default=20000.0)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "bench_readout.json")
    parser.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    parser.add_argument("--record", action="store_true",
                        help="also write benchmarks/records/bench_readout.json and regenerate RESULTS.md")
    args = parser.parse_args(argv)
    from _records import Record, Table, command_line, machine_info, record_and_report

    started = machine_info()

    os.environ["STD_DAQ_IPC_DIR"] = tempfile.mkdtemp(prefix="sdqb", dir="/tmp")
    port = free_udp_port()
    config = parse_config({
        "detector_name": f"bench{uuid.uuid4().hex[:6]}", "detector_type": "jungfrau", "n_modules": 1,
        "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": port,
        "frame_ring_slots": 256, "image_ring_slots": 256,
    })
    facts = machine_facts(config)
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, kernel {facts['kernel']}, "
          f"rmem_max {facts['net.core.rmem_max']}, receiver buffer {facts['receiver_rcvbuf_granted']} B")

    print(f"loopback limit: simulator -> unread socket, {args.duration:.0f} s ...", flush=True)
    limit = loopback_limit(config, args.duration)
    print(f"  {limit['images_per_s']:.0f} frames/s = {limit['gb_per_s']:.2f} GB/s "
          f"(simulator {limit['sender_cpu_s_per_gb']:.2f} CPU s/GB)")

    rig = ReadoutRig(config)
    steps: list[dict[str, Any]] = []
    try:
        rig.warm_up()
        rate, best, worst = args.start_rate, None, None
        while rate <= args.max_rate:
            step = rig.step(rate, args.duration)
            steps.append(step)
            _print_step(step)
            if step["lost"]:
                worst = step
                break
            if best is None or step["sent_rate_hz"] > best["sent_rate_hz"]:
                best = step
            if step["sender_limited"]:
                break  # the simulator cannot send faster on this machine: that is the limit
            rate *= args.factor
        for _ in range(args.refine if best and worst else 0):
            rate = (best["rate_hz"] + worst["rate_hz"]) / 2
            step = rig.step(rate, args.duration)
            steps.append(step)
            _print_step(step)
            if step["lost"]:
                worst = step
            elif step["sent_rate_hz"] > best["sent_rate_hz"]:
                best = step
    finally:
        rig.close()
        os.rmdir(os.environ["STD_DAQ_IPC_DIR"])

    result = {
        "benchmark": "readout, jungfrau 1 module",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": facts,
        "duration_per_step_s": args.duration,
        "loopback_limit": limit,
        "zero_loss": best,
        "first_lossy": worst,
        "steps": steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print()
    print(f"{'':32}{'frames/s':>10}{'GB/s':>8}   CPU s/GB")
    print(f"{'loopback limit (simulator)':32}{limit['images_per_s']:>10.0f}{limit['gb_per_s']:>8.2f}   "
          f"simulator {limit['sender_cpu_s_per_gb']:.2f}")
    if best:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in best["cpu_s_per_gb"].items())
        print(f"{'highest zero-loss rate':32}{best['sent_rate_hz']:>10.0f}{best['gb_per_s']:>8.2f}   {cpu}")
    else:
        print("no rate without loss")
    print(f"written {args.out}")
    if args.record:
        rows = [[f"{st['rate_hz']:.0f}", f"{st['sent_rate_hz']:.0f}", f"{st['good']}/{st['images']}",
                 st["flagged"], st["missing"], st["kernel_drops"],
                 ", ".join(f"{k} {v:.2f}" for k, v in st["cpu_s_per_gb"].items()),
                 "yes" if st["sender_limited"] else "no"] for st in steps]
        table = Table("Readout rate steps (Jungfrau, 1 module, 1 MiB frames)",
                      ["requested Hz", "sent/s", "good", "flagged", "missing", "kernel drops", "CPU s/GB",
                       "sender-limited"], rows,
                      f"Loopback limit (simulator into an unread socket): {limit['images_per_s']:.0f} "
                      f"frames/s = {limit['gb_per_s']:.2f} GB/s.")
        ours = "no lossless step"
        if best:
            ours = (f"{best['sent_rate_hz']:.0f} frames/s = {best['gb_per_s']:.2f} GB/s"
                    + (" (sender-limited)" if best["sender_limited"] else ""))
        headline = [["readout (UDP -> sync -> assembled ring), 1 Jungfrau module, zero loss", ours,
                     f"simulator alone {limit['images_per_s']:.0f} frames/s"]]
        record_and_report(Record("bench_readout", command_line("bench_readout.py", argv), tables=[table],
                                 figures={"headline": headline}, notes=list(args.note), raw=result),
                          started)
    return 0


def _print_step(step: dict[str, Any]) -> None:
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in step["cpu_s_per_gb"].items())
    print(f"  {step['rate_hz']:8.0f} Hz (sent {step['sent_rate_hz']:7.0f}): "
          f"{step['good']}/{step['images']} good, "
          f"{step['flagged']} flagged, {step['missing']} missing, kernel drops {step['kernel_drops']}; "
          f"CPU s/GB {cpu}; other programs {step['other_programs_cpu_s']:.1f} CPU s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
