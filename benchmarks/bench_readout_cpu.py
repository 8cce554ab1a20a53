"""CPU per frame of the readout processes (receiver, assembler) from their own /proc times.

Starts one receiver and one assembler as separate processes (``python -m daq_backend.readout...``,
as the supervisor does), feeds them ``--frames`` 1-module Jungfrau frames at each ``--rates`` with the
built-in simulator (in a process of its own), waits until the assembler's image ring holds the last
image, and reads each process's ``utime + stime`` from ``/proc/<pid>/stat`` before and after: a figure
that other programs on a shared machine move far less than wall-clock rates (it is this process's own
CPU, not the machine's). ``--subscriber`` adds a SUB to the ``ImageMetadata`` stream (what the writer
agent, stream-send or live-stream would be), so the cost of publishing is measured too. Before each
run both processes are watched idle for ``IDLE_S`` seconds: wake-ups per second (voluntary context
switches of all their threads) and CPU per second. Latency: from the simulator's return from the
``sendmmsg`` of an image's last packet to a follower of the image ring (a thread of this process)
seeing the image committed, p50 / p99 / max.

``--tree DIR`` runs another checkout's ``daq_backend`` (put first on ``PYTHONPATH``): before/after
comparisons in one run, alternating, so that the machine's load hits both alike.

    python benchmarks/bench_readout_cpu.py --rates 100,1000 --frames 2000 --tree /tmp/base --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from _net import free_udp_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: seconds the processes are watched idle (no packets) before each measured run
IDLE_S = 5.0


def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wakeups(pid: int) -> int:
    """Context switches the process's threads made of their own accord (sleeps), summed."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as fh:
                for line in fh:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total


def run_point(tree: Path, rate: float, frames: int, subscriber: bool) -> dict[str, Any]:
    """One receiver + assembler of ``tree`` at ``rate`` Hz; CPU ms per frame of each."""
    import zmq

    from daq_backend import ipc
    from daq_backend.config import parse_config
    from daq_backend.formats import ImageMetadata
    from daq_backend.ram_buffer import RingBuffer, RingFollower
    from daq_backend.simulator.sender import DetectorSimulator

    sent: dict[int, float] = {}

    class StampedSimulator(DetectorSimulator):
        def send_image(self, image_id: int) -> None:
            super().send_image(image_id)  # returns when sendmmsg took the last packet
            sent[image_id] = time.monotonic()

    ipc_dir = tempfile.mkdtemp(prefix="sdqc", dir="/tmp")
    # ``python -m`` puts the working directory first on sys.path: run in the tree measured
    env = {**os.environ, "STD_DAQ_IPC_DIR": ipc_dir, "PYTHONPATH": str(tree)}
    os.environ["STD_DAQ_IPC_DIR"] = ipc_dir
    config = parse_config({
        "detector_name": f"c{uuid.uuid4().hex[:8]}", "detector_type": "jungfrau", "n_modules": 1,
        "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
        "start_udp_port": free_udp_port(), "frame_ring_slots": 1000, "image_ring_slots": 1000,
    })
    path = Path(ipc_dir) / "config.json"
    path.write_text(config.model_dump_json())
    logs = open(Path(ipc_dir) / "log", "w")  # noqa: SIM115
    procs = {
        "receiver": subprocess.Popen([sys.executable, "-m", "daq_backend.readout.receiver", str(path), "0",
                                      "--log-level", "WARNING"], env=env, stdout=logs, stderr=logs, cwd=tree),
        "assembler": subprocess.Popen([sys.executable, "-m", "daq_backend.readout.assembler", str(path),
                                       "--log-level", "WARNING"], env=env, stdout=logs, stderr=logs,
                                      cwd=tree),
    }
    sub = None
    # a stats collector, as the supervisor binds in production: without one the processes' stats
    # sockets would keep reconnecting (ZMQ tries every 100 ms), wake-ups the idle count would show
    stats = zmq.Context.instance().socket(zmq.PULL)
    stats.setsockopt(zmq.LINGER, 0)
    stats.bind(ipc.stats_address(config.detector_name))
    try:
        ring = RingBuffer.attach(ipc.image_ring_name(config.detector_name), timeout=60, populate=False)
        seen = [0]
        if subscriber:
            sub = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(ipc.image_metadata_address(config.detector_name))
        time.sleep(3.0)  # both processes mapped their rings (pages populated) and settled
        with DetectorSimulator(config, rate_hz=50, n_images=20, start_id=1) as sim:  # warm-up
            sim.run()
        deadline = time.monotonic() + 60
        while not ring.holds(20) and time.monotonic() < deadline:
            time.sleep(0.01)
        idle0 = {name: (wakeups(p.pid), proc_cpu(p.pid)) for name, p in procs.items()}
        time.sleep(IDLE_S)
        idle = {name: {"wakeups_per_s": round((wakeups(p.pid) - idle0[name][0]) / IDLE_S, 1),
                       "cpu_ms_per_s": round((proc_cpu(p.pid) - idle0[name][1]) * 1000 / IDLE_S, 1)}
                for name, p in procs.items()}
        committed: dict[int, float] = {}
        following = threading.Event()
        following.set()
        follower = RingFollower(ipc.image_ring_name(config.detector_name), populate=False)
        follower.attach()

        def follow() -> None:
            while following.is_set():
                if follower.wait(0.2):
                    now = time.monotonic()
                    for image_id in follower.take().ids:
                        committed.setdefault(image_id, now)

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        cpu0 = {name: proc_cpu(p.pid) for name, p in procs.items()}
        t0 = time.monotonic()
        with StampedSimulator(config, rate_hz=rate, n_images=frames, start_id=21) as sim:
            sim.run()
            achieved = sim.achieved_rate
        last = 20 + frames
        deadline = time.monotonic() + 60
        while not ring.holds(last) and time.monotonic() < deadline:
            if sub is not None:
                while sub.poll(0):
                    ImageMetadata.unpack(sub.recv())
                    seen[0] += 1
            time.sleep(0.005)
        wall = time.monotonic() - t0
        cpu1 = {name: proc_cpu(p.pid) for name, p in procs.items()}
        following.clear()
        watcher.join(5)
        follower.close()
        complete = bool(ring.holds(last))
        ring.close()
    finally:
        stats.close()
        if sub is not None:
            sub.close()
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(30)
        logs.close()
        for name in (ipc.frame_ring_name(config.detector_name, 0), ipc.image_ring_name(config.detector_name)):
            Path("/dev/shm", name).unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", ipc_dir], check=False)
    per_frame = {name: round((cpu1[name] - cpu0[name]) * 1000 / frames, 3) for name in procs}
    lat = sorted((committed[i] - sent[i]) * 1000 for i in sent if i in committed)
    latency: dict[str, float] = {"n": len(lat)}
    if lat:
        p99 = lat[min(len(lat) - 1, len(lat) * 99 // 100)]
        latency.update(p50_ms=round(lat[len(lat) // 2], 2), p99_ms=round(p99, 2), max_ms=round(lat[-1], 2))
    return {"rate_hz": rate, "achieved_hz": round(achieved, 1), "frames": frames, "wall_s": round(wall, 2),
            "last_image_in_ring": complete, "cpu_ms_per_frame": per_frame,
            "readout_ms_per_frame": round(sum(per_frame.values()), 3), "idle": idle,
            "latency_to_image_ring": latency}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="100,1000", help="comma-separated frame rates in Hz")
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tree", type=Path, action="append", default=[],
                   help="another checkout whose daq_backend to measure too (repeatable)")
    p.add_argument("--subscriber", action="store_true", help="subscribe to the ImageMetadata stream")
    p.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = p.parse_args()
    trees = [ROOT, *args.tree]
    results = []
    for repeat in range(args.repeats):
        for rate in (float(r) for r in args.rates.split(",")):
            for tree in trees if repeat % 2 == 0 else trees[::-1]:
                point = run_point(tree, rate, args.frames, args.subscriber)
                point.update(tree=str(tree), repeat=repeat, subscriber=args.subscriber)
                print(json.dumps(point), flush=True)
                results.append(point)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
