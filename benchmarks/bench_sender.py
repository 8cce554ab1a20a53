"""The built-in simulator's own ceiling: how fast ``DetectorSimulator`` sends, free-running, per detector.

A pipeline figure measured with the simulator is a statement about the pipeline only when the
simulator was not the limit; this benchmark says where that limit is on this machine. For each detector
(GigaFRoST 128x480 8 modules, Jungfrau 1 module, Eiger 0.5M 4 half modules, by default) and each batch
size (``--batches``: ``default`` = as many images per ``sendmmsg`` as fit into 1024 datagrams, ``1`` =
one image per call) the simulator sends free-running for ``--seconds`` into one of two sinks:

* ``unread``: a socket per module port, bound with a small (256 KiB) buffer and never read: the
  kernel takes every datagram (the copy is paid) and drops it at the full socket. Nothing else runs:
  the sender's own ceiling. (A large unread buffer would measure the kernel's UDP memory pressure.)
* ``drained``: a C ``recvmmsg`` drain per module port (``_drain.py``) receives and counts everything:
  what loopback carries with a receiver on the same cores.

Figures per point: images/s, packets/s, GB/s of image data, the sender's CPU (cores busy and µs per
image), and for ``drained`` the share of packets that arrived. ``--record`` writes
``benchmarks/records/bench_sender.json`` and regenerates ``RESULTS.md`` and the README table.

    python benchmarks/bench_sender.py --seconds 3 --record
    python benchmarks/bench_sender.py --detectors gigafrost_128x480 --sinks unread --seconds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from _drain import UdpDrain  # noqa: E402
from _net import free_udp_base  # noqa: E402
from _records import Record, Table, command_line, machine_info, write_record  # noqa: E402

from daq_backend.config import DetectorConfig, load_config, parse_config  # noqa: E402
from daq_backend.simulator.sender import DetectorSimulator, ParallelSimulator  # noqa: E402

REPO = BENCH_DIR.parent
DETECTORS: dict[str, str] = {
    "gigafrost_128x480": "configs/gigafrost_128x480.json",
    "jungfrau_1m": "configs/jungfrau_1m.json",
    "eiger_0_5m": "configs/eiger_0_5m.json",
    "jungfrau_4m": "configs/jungfrau_4m.json",
}
DEFAULT_DETECTORS = ("gigafrost_128x480", "jungfrau_1m", "eiger_0_5m")
SINKS = ("unread", "drained")
UNREAD_BUFFER = 256 << 10
DRAIN_BUFFER = 64 << 20


@contextlib.contextmanager
def unread_sink(base: int, n: int) -> Iterator[None]:
    """Sockets bound on ``base .. base+n-1`` with small buffers that nobody reads."""
    socks: list[socket.socket] = []
    try:
        for port in range(base, base + n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            try:
                s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), UNREAD_BUFFER)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UNREAD_BUFFER)
            s.bind(("127.0.0.1", port))
        yield
    finally:
        for s in socks:
            s.close()


def measure(config: DetectorConfig, sink: str, max_batch: int | None, seconds: float, processes: int = 1,
            n_images: int | None = None) -> dict[str, Any]:
    """Send free-running for ``seconds`` into ``sink``; the figures of that run. With ``processes``
    > 1 the modules are sent by that many processes (:class:`ParallelSimulator`), ``n_images``
    images in all (they run to a count, not a time)."""
    if processes > 1:
        return _measure_parallel(config, sink, max_batch, processes, n_images or 1000)
    n_ports = config.n_modules
    base = free_udp_base(n_ports)
    data = config.to_json_dict()
    data.update(start_udp_port=base, detector_name=f"bsend{base}")
    cfg = parse_config(data)
    drains: list[UdpDrain] = []
    counted = None
    with contextlib.ExitStack() as stack:
        if sink == "unread":
            stack.enter_context(unread_sink(base, n_ports))
        else:
            for port in range(base, base + n_ports):
                drain = UdpDrain(port, DRAIN_BUFFER, 1)
                stack.callback(drain.kill)
                drains.append(drain.start())
        sim = stack.enter_context(DetectorSimulator(cfg, rate_hz=0, n_images=None, max_batch=max_batch))
        stop = threading.Event()
        cpu0, wall0 = time.process_time(), time.monotonic()
        sim.start()
        stop.wait(seconds)
        sim.stop(timeout=60)
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        if sim.error is not None:
            raise RuntimeError(f"the simulator failed: {sim.error!r}")
        if drains:
            time.sleep(0.2)  # the last batch reaches the drains
            counted = sum(d.finish().packets for d in drains)
        images, packets, elapsed = sim.n_sent_images, sim.n_sent_packets, sim.elapsed or wall
        batch = sim.max_batch
    result: dict[str, Any] = {
        "images": images, "packets": packets, "seconds": round(elapsed, 3), "max_batch": batch,
        "images_per_s": round(images / elapsed, 1), "packets_per_s": round(packets / elapsed),
        "gbps": round(images * config.image_nbytes / elapsed / 1e9, 3),
        "cpu_cores": round(cpu / wall, 3), "cpu_us_per_image": round(cpu / max(images, 1) * 1e6, 2),
    }
    if counted is not None:
        result["received_pct"] = round(100.0 * counted / max(packets, 1), 2)
    return result


@contextlib.contextmanager
def _sink(sink: str, base: int, n_ports: int) -> Iterator[list[UdpDrain]]:
    drains: list[UdpDrain] = []
    with contextlib.ExitStack() as stack:
        if sink == "unread":
            stack.enter_context(unread_sink(base, n_ports))
        else:
            for port in range(base, base + n_ports):
                drain = UdpDrain(port, DRAIN_BUFFER, 1)
                stack.callback(drain.kill)
                drains.append(drain.start())
        yield drains


def _measure_parallel(config: DetectorConfig, sink: str, max_batch: int | None, processes: int,
                      n_images: int) -> dict[str, Any]:
    base = free_udp_base(config.n_modules)
    data = config.to_json_dict()
    data.update(start_udp_port=base, detector_name=f"bsend{base}")
    cfg = parse_config(data)
    counted = None
    with _sink(sink, base, config.n_modules) as drains:
        sim = ParallelSimulator(cfg, processes, rate_hz=0, n_images=n_images, max_batch=max_batch)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        sim.run()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if drains:
            time.sleep(0.2)
            counted = sum(d.finish().packets for d in drains)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    elapsed = max(sim.elapsed, 1e-9)
    images, packets = sim.n_sent_images, sim.n_sent_packets
    result: dict[str, Any] = {
        "images": images, "packets": packets, "seconds": round(elapsed, 3), "processes": sim.processes,
        "max_batch": max_batch or "default",
        "images_per_s": round(images / elapsed, 1), "packets_per_s": round(packets / elapsed),
        "gbps": round(images * config.image_nbytes / elapsed / 1e9, 3),
        "cpu_cores": round(cpu / elapsed, 3), "cpu_us_per_image": round(cpu / max(images, 1) * 1e6, 2),
    }
    if counted is not None:
        result["received_pct"] = round(100.0 * counted / max(packets, 1), 2)
    return result


def run(detectors: list[str], sinks: list[str], batches: list[str], seconds: float,
        processes: list[int] | None = None) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    for name in detectors:
        config = load_config(REPO / DETECTORS[name])
        for sink in sinks:
            for batch in batches:
                max_batch = None if batch == "default" else int(batch)
                figures = measure(config, sink, max_batch, seconds)
                point = {"detector": name, "sink": sink, "batch": batch, "modules": config.n_modules,
                         "image_bytes": config.image_nbytes, "processes": 1, **figures}
                print(json.dumps(point), flush=True)
                points.append(point)
                for n in processes or []:
                    if n <= 1 or config.n_modules < 2:
                        continue
                    count = max(100, int(figures["images_per_s"] * seconds * min(n, config.n_modules)))
                    more = measure(config, sink, max_batch, seconds, n, count)
                    extra = {"detector": name, "sink": sink, "batch": batch, "modules": config.n_modules,
                             "image_bytes": config.image_nbytes, **more}
                    print(json.dumps(extra), flush=True)
                    points.append(extra)
    return {"points": points}


def ceiling_key(detector: str, sink: str = "unread", batch: str = "default") -> str:
    return f"{detector}.{sink}.{batch}"


def to_record(doc: dict[str, Any], command: str, notes: list[str]) -> Record:
    rows = []
    figures: dict[str, Any] = {}
    for p in doc["points"]:
        batch = p["batch"]
        if batch == "default" and isinstance(p["max_batch"], int):
            batch = f"default ({p['max_batch']})"
        rows.append([p["detector"], p["modules"], p["sink"], batch, p.get("processes", 1), p["images_per_s"],
                     p["packets_per_s"], p["gbps"], p["cpu_cores"], p["cpu_us_per_image"],
                     p.get("received_pct", "–")])
        key = ceiling_key(p["detector"], p["sink"], p["batch"])
        if p.get("processes", 1) > 1:
            key += f".{p['processes']}proc"
        for name in ("images_per_s", "packets_per_s", "gbps", "cpu_us_per_image"):
            figures[f"{key}.{name}"] = p[name]
    table = Table(
        "Simulator ceiling (free-running)",
        ["detector", "modules", "sink", "images per sendmmsg batch", "processes", "images/s", "packets/s",
         "GB/s", "sender CPU cores", "CPU µs/image", "received %"],
        rows,
        "*unread*: bound sockets nobody reads (the sender alone); *drained*: a C recvmmsg drain per port "
        "on the same cores. *images per sendmmsg batch* `1` is one image per system call; *processes* > 1: "
        "the modules split over that many sender processes (`std-daq simulate --processes`), run to a count "
        "of images; their CPU includes each child's start-up (interpreter, pattern).",
    )
    return Record("bench_sender", command, figures=figures, tables=[table], notes=notes, raw=doc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_sender.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--detectors", default=",".join(DEFAULT_DETECTORS),
                   help=f"comma-separated, of {', '.join(DETECTORS)} (default {','.join(DEFAULT_DETECTORS)})")
    p.add_argument("--sinks", default=",".join(SINKS), help="unread,drained (default both)")
    p.add_argument("--batches", default="default,1",
                   help="images per sendmmsg batch: default and/or numbers (default 'default,1')")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per point (default 3)")
    p.add_argument("--processes", default="2",
                   help="also send from this many processes (comma-separated; 1 or '' = none; default 2)")
    p.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    p.add_argument("--record", action="store_true", help="write benchmarks/records/bench_sender.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    detectors = [d for d in args.detectors.split(",") if d]
    sinks = [s for s in args.sinks.split(",") if s]
    batches = [b for b in args.batches.split(",") if b]
    bad = [d for d in detectors if d not in DETECTORS] + [s for s in sinks if s not in SINKS]
    bad += [b for b in batches if b != "default" and not b.isdigit()]
    if bad or args.seconds <= 0:
        raise SystemExit(f"bench_sender.py: unknown or bad {', '.join(bad) or '--seconds'}")
    machine = machine_info()
    processes = [int(n) for n in args.processes.split(",") if n.strip()]
    doc = run(detectors, sinks, batches, args.seconds, processes)
    record = to_record(doc, command_line("bench_sender.py", argv), args.note)
    if args.record:
        print(f"recorded in {write_record(record, machine)}")
        import report

        report.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
