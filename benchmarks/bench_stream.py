"""Buffer replication throughput over loopback TCP, beside raw pyzmq on the same machine.

* ``raw pyzmq``: one process PUSHes N messages of the image size (``copy=False``; one reused, cache-hot
  buffer, or as many buffers as the replication's ring), another PULLs them (``copy=False``) - the
  ceiling ZMQ over loopback gives; and the same with the PULL landing each message in a ring with
  ``recv_into`` - the ceiling for any receiver that has to fill a ring buffer, as stream-recv does.
* ``replication``: this process plays the assembler (owns host A's image ring, publishes
  ``ImageMetadata``; slots are filled once, then re-committed without copying, so only replication
  is measured), ``std-daq stream-send`` and ``stream-recv`` run as separate processes (host B = its
  own ipc dir and /dev/shm prefix). The producer keeps at most ``--window`` images unpublished on B
  (credit flow control via B's metadata stream), so nothing is dropped; the run fails if B lost,
  discarded or corrupted anything.

Rates are measured between the first and the last image arriving (raw: at the PULL; replication: on
B's metadata stream). CPU = user+system seconds per wall second of each process (100 % = one core).
Writes ``benchmarks/out/bench_stream.{json,md}``. Example::

    python benchmarks/bench_stream.py --sizes 1 4 --images 2000 500
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.formats import DTYPE_CODES, ImageMetadata
from daq_backend.ram_buffer import RingBuffer, shm_path
from daq_backend.stream.recv import read_recv_state

OUT = Path(__file__).resolve().parent / "out"
MIB = 1 << 20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


# -- raw pyzmq baseline ---------------------------------------------------------------------------


def _raw_push(address: str, nbytes: int, count: int, pool: int) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 64)
    push.connect(address)
    payloads = np.full((pool, nbytes), 7, dtype=np.uint8)  # pool > 1: cold buffers, like ring slots
    cpu0 = time.process_time()
    for i in range(count):
        push.send(payloads[i % pool], copy=False)
    push.close(linger=-1)
    ctx.term()
    print(json.dumps({"cpu_seconds": time.process_time() - cpu0}), flush=True)


def _raw_pull(address_file: str, count: int, ring_slots: int, nbytes: int) -> None:
    """``ring_slots`` > 0: land every message in a (pre-touched) ring with ``recv_into``, the copy any
    receiver that fills a ring buffer has to make; else keep ZMQ's own buffer (``copy=False``)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 64)
    pull.bind("tcp://127.0.0.1:*")
    ring = np.ones((ring_slots, nbytes), dtype=np.uint8) if ring_slots else None
    Path(address_file).write_text(pull.getsockopt_string(zmq.LAST_ENDPOINT))
    pull.recv(copy=False)
    t0, cpu0, total = time.perf_counter(), time.process_time(), 0
    for i in range(count - 1):
        if ring is not None:
            total += pull.recv_into(ring[i % ring_slots])
        else:
            total += len(pull.recv(copy=False))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    print(json.dumps({"elapsed": elapsed, "bytes": total, "cpu_seconds": cpu}), flush=True)
    pull.close()
    ctx.term()


def bench_raw(nbytes: int, count: int, pool: int = 1, into_ring: bool = False) -> dict[str, Any]:
    """PUSH -> PULL of ``count`` messages sent from ``pool`` buffers in turn (and, ``into_ring``,
    received into a ring of ``pool`` slots); the rate is taken over messages 2..count at the PULL."""
    with tempfile.TemporaryDirectory() as tmp:
        address_file = Path(tmp) / "address"
        me = [sys.executable, __file__]
        pull = subprocess.Popen(
            [*me, "--raw-pull", str(address_file), str(count), str(pool if into_ring else 0), str(nbytes)],
            stdout=subprocess.PIPE, text=True,
        )
        while not address_file.exists() or not address_file.read_text():
            time.sleep(0.01)
        address = address_file.read_text()
        push = subprocess.Popen([*me, "--raw-push", address, str(nbytes), str(count), str(pool)],
                                stdout=subprocess.PIPE, text=True)
        pulled = json.loads(pull.communicate(timeout=600)[0])
        pushed = json.loads(push.communicate(timeout=600)[0])
    elapsed = pulled["elapsed"]
    return {
        "elapsed": elapsed,
        "images": count - 1,
        "bytes": pulled["bytes"],
        # the sender's CPU covers its whole run (incl. the first message), close to the same window
        "cpu": {"push": pushed["cpu_seconds"] / elapsed, "pull": pulled["cpu_seconds"] / elapsed},
    }


# -- replication ----------------------------------------------------------------------------------


def jungfrau(modules: int, slots: int) -> DetectorConfig:
    return parse_config(
        {
            "detector_name": f"bench{uuid.uuid4().hex[:6]}",
            "detector_type": "jungfrau",
            "n_modules": modules,
            "bit_depth": 16,
            "image_pixel_height": 512 * modules,
            "image_pixel_width": 1024,
            "start_udp_port": 50000,
            "image_ring_slots": slots,
        }
    )


class _Env:
    """Switch this process between the two simulated hosts (ipc dir + /dev/shm prefix)."""

    def __init__(self, root: Path) -> None:
        self.hosts: dict[str, dict[str, str]] = {}
        for label in ("a", "b"):
            (root / label).mkdir()
            self.hosts[label] = {
                "STD_DAQ_IPC_DIR": str(root / label),
                "STD_DAQ_SHM_PREFIX": f"{label}{uuid.uuid4().hex[:6]}-",
            }

    def use(self, label: str) -> None:
        os.environ.update(self.hosts[label])

    def process_env(self, label: str) -> dict[str, str]:
        return {**os.environ, **self.hosts[label]}


def ring_slots(window: int) -> int:
    return max(4 * window, 32)


def bench_replication(size_mib: int, count: int, window: int, rcvhwm: int = 32) -> dict[str, Any]:
    config = jungfrau(size_mib, slots=ring_slots(window))
    root = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    config_file = root / "detector.json"
    config_file.write_text(json.dumps(config.to_json_dict()))
    env = _Env(root)
    env.use("a")
    ring = RingBuffer.create(ipc.image_ring_name(config.detector_name), config.image_nbytes,
                             config.image_ring_slots)
    rng = np.random.default_rng(1)
    for slot in range(ring.n_slots):  # real-looking pixels once; afterwards only re-commits
        ring.write(slot, rng.integers(0, 4096, config.image_nbytes // 2, dtype=np.uint16))
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.bind(ipc.image_metadata_address(config.detector_name))
    probe = ctx.socket(zmq.PULL)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    address = f"tcp://127.0.0.1:{port}"
    py = [sys.executable, "-m"]
    sender = subprocess.Popen([*py, "daq_backend.stream.send", str(config_file), "--address", address,
                               "--log-level", "WARNING"], env=env.process_env("a"))
    receiver = subprocess.Popen([*py, "daq_backend.stream.recv", str(config_file), "--address", address,
                                 "--log-level", "WARNING", "--hwm", str(rcvhwm)], env=env.process_env("b"))
    env.use("b")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ipc.image_metadata_address(config.detector_name))
    env.use("a")
    h, w = config.image_shape
    code = DTYPE_CODES[config.image_dtype]
    next_id = 0

    def publish() -> None:
        nonlocal next_id
        ring.begin_write(next_id)
        meta = ImageMetadata(next_id, h, w, code, user_2=next_id + 1).pack()
        ring.commit(next_id, meta)
        pub.send(meta)
        next_id += 1

    try:
        # Warm up until B republishes (every connection made); from then on B sees every image.
        while not sub.poll(200):
            publish()
            if sender.poll() is not None or receiver.poll() is not None:
                raise RuntimeError("stream-send or stream-recv exited")
        newest = ImageMetadata.unpack(sub.recv()).id
        while newest < next_id - 1:  # let the warm-up drain
            newest = ImageMetadata.unpack(sub.recv()).id
        procs = {"producer": psutil.Process(), "stream-send": psutil.Process(sender.pid),
                 "stream-recv": psutil.Process(receiver.pid)}
        end_id = next_id + count
        first: float | None = None
        cpu0: dict[str, float] = {}
        while newest < end_id - 1:
            while next_id - newest - 1 < window and next_id < end_id:
                publish()
            if not sub.poll(30_000):
                raise RuntimeError(f"B stopped publishing after image {newest}: {read_b(config, env)}")
            newest = ImageMetadata.unpack(sub.recv()).id
            if first is None:
                first = time.perf_counter()
                cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
        last = time.perf_counter()
        cpu1 = {k: cpu_seconds(p) for k, p in procs.items()}
        assert first is not None
        state = read_b(config, env)
        env.use("b")
        with RingBuffer.attach(ipc.image_ring_name(config.detector_name)) as ring_b:
            if ring_b.read(newest) != ring.read(newest):
                raise RuntimeError(f"image {newest} on B differs from A's")
        env.use("a")
        bad = {k: state[k] for k in ("lost", "torn", "lapped", "overrun", "rejected") if state.get(k)}
        if bad:
            raise RuntimeError(f"replication lost or discarded images: {bad}")
        return {
            "elapsed": last - first,
            "images": count - 1,
            "bytes": (count - 1) * config.image_nbytes,
            "cpu": {k: (cpu1[k] - cpu0[k]) / (last - first) for k in procs},
        }
    finally:
        for proc in (sender, receiver):
            proc.terminate()
            proc.wait(timeout=60)
        sub.close(linger=0)
        pub.close(linger=0)
        ring.close()
        for label in ("a", "b"):
            env.use(label)
            for name in (ipc.image_ring_name(config.detector_name),
                         ipc.stream_recv_state_name(config.detector_name)):
                shm_path(name).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def read_b(config: DetectorConfig, env: _Env) -> dict[str, int]:
    env.use("b")
    try:
        return read_recv_state(config) or {}
    finally:
        env.use("a")


# -- report ---------------------------------------------------------------------------------------

HEADER = (
    "| date | machine | test | image | images | images/s | GB/s | CPU % (per process) |\n"
    "|---|---|---|---|---|---|---|---|"
)


def row(date: str, machine: str, test: str, size_mib: int, result: dict[str, Any]) -> str:
    rate = result["images"] / result["elapsed"]
    gbs = result["bytes"] / result["elapsed"] / 1e9
    cpu = ", ".join(f"{k} {100 * v:.0f}" for k, v in result["cpu"].items())
    cells = [date, machine, test, f"{size_mib} MiB", str(result["images"]), f"{rate:.0f}", f"{gbs:.2f}", cpu]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4], help="image sizes in MiB")
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 500], help="images per size")
    parser.add_argument("--window", type=int, default=16, help="images in flight (replication)")
    parser.add_argument("--rcvhwm", type=int, default=32, help="stream-recv --hwm")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median run is shown")
    parser.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    parser.add_argument("--record", action="store_true",
                        help="also write benchmarks/records/bench_stream.json and regenerate RESULTS.md")
    args = parser.parse_args(argv)
    from _records import Record, command_line, machine_info, record_and_report, table_from_markdown

    started = machine_info()
    if len(args.images) != len(args.sizes):
        parser.error("--images needs one count per --sizes entry")
    date = datetime.date.today().isoformat()
    machine = f"{cpu_model()}, {psutil.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    results: list[dict[str, Any]] = []
    lines = [HEADER]
    for size, count in zip(args.sizes, args.images, strict=True):
        slots = ring_slots(args.window)
        tests: dict[str, Callable[[], dict[str, Any]]] = {
            "raw pyzmq PUSH/PULL, one buffer": partial(bench_raw, size * MIB, count),
            f"raw pyzmq PUSH/PULL, {slots} buffers": partial(bench_raw, size * MIB, count, slots),
            f"raw pyzmq, {slots} buffers, PULL recv_into a ring": partial(
                bench_raw, size * MIB, count, slots, True
            ),
            f"replication send->recv (window {args.window})": partial(
                bench_replication, size, count, args.window, args.rcvhwm
            ),
        }
        for test, run in tests.items():
            runs = [run() for _ in range(args.repeat)]
            median = sorted(runs, key=lambda r: r["images"] / r["elapsed"])[len(runs) // 2]
            lines.append(row(date, machine, test, size, median))
            print(lines[-1], flush=True)
            rates = [round(r["images"] / r["elapsed"]) for r in runs]
            results.append({"date": date, "machine": machine, "test": test, "image_mib": size,
                            "images_per_s_runs": rates, **median})
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_stream.json").write_text(json.dumps(results, indent=2))
    (OUT / "bench_stream.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.record:
        table = table_from_markdown("Buffer replication and raw pyzmq (median of the runs)", HEADER,
                                    lines[1:])
        headline = []
        for size in args.sizes:
            of_size = [r for r in results if r["image_mib"] == size]
            ours = next((r for r in of_size if r["test"].startswith("replication")), None)
            peer = next((r for r in of_size if r["test"].endswith("into a ring")), None)
            if ours and peer:
                headline.append([f"buffer replication, loopback TCP, {size} MiB images",
                                 f"{ours['bytes'] / ours['elapsed'] / 1e9:.2f} GB/s",
                                 f"raw pyzmq into a ring {peer['bytes'] / peer['elapsed'] / 1e9:.2f} GB/s"])
        record_and_report(Record("bench_stream", command_line("bench_stream.py", argv), tables=[table],
                                 figures={"headline": headline}, notes=list(args.note),
                                 raw={"results": results}), started)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-push":
        _raw_push(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--raw-pull":
        _raw_pull(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
