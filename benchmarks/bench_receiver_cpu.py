"""Receiver CPU per packet: one Jungfrau ``ModuleReceiver`` (its own process) fed by the simulator.

Compares the per-packet path (``recv_into`` + header parse + copy per datagram, ``--batch 0``) with
the ``recvmmsg`` batch path (``--batch 128``): the simulator (this process, ``sendmmsg``) sends
``--frames`` 1 MiB frames (128 datagrams of 8240 bytes) over loopback at ``--rate`` frames/s (0 = as
fast as it can) and the receiver's user and system CPU (psutil, whole process) over the send is
divided by the packets it received. Frames are announced to a PULL socket in this process, as to
the synchroniser; the kernel's drops on the receiver's socket come from ``/proc/net/udp``.

    python benchmarks/bench_receiver_cpu.py [--frames 3000] [--rate 1100] [--batch 0 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

import psutil
from _net import free_udp_port, udp_drops

from daq_backend import ipc
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.formats import ModuleFrame
from daq_backend.ram_buffer import RingFollower, SlotOverwritten


def _receiver(config_json: str, batch: int, coalesce: float | None, rcvbuf: int | None, ipc_dir: str,
              conn: Connection) -> None:
    """Child process: the receiver runs in the main thread until the parent says stop."""
    os.environ["STD_DAQ_IPC_DIR"] = ipc_dir
    from daq_backend.readout.receiver import ModuleReceiver

    config = DetectorConfig.model_validate_json(config_json)
    receiver = ModuleReceiver(config, 0, recv_batch=batch, coalesce=coalesce, rcvbuf=rcvbuf, idle_flush=0.5)
    try:
        def wait_stop() -> None:
            conn.recv()
            receiver.stop()

        threading.Thread(target=wait_stop, daemon=True).start()
        conn.send(("ready", receiver.rcvbuf, receiver._batch is not None))
        receiver.run()
        conn.send((receiver.stats.snapshot(), receiver.n_fast_packets))
    finally:
        receiver.close()


def run_once(batch: int, frames: int, rate: float, coalesce: float | None = None,
             rcvbuf: int | None = None) -> dict[str, Any]:
    from daq_backend.simulator.sender import DetectorSimulator

    ipc_dir = tempfile.mkdtemp(prefix="sdqb", dir="/tmp")
    os.environ["STD_DAQ_IPC_DIR"] = ipc_dir
    port = free_udp_port()
    config = parse_config({
        "detector_name": f"b{uuid.uuid4().hex[:8]}", "detector_type": "jungfrau", "n_modules": 1,
        "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
        "start_udp_port": port, "frame_ring_slots": 64, "image_ring_slots": 4,
    })
    follower = RingFollower(ipc.frame_ring_name(config.detector_name, 0), from_start=True, populate=False)
    got = {"frames": 0, "complete": 0}
    running = threading.Event()
    running.set()

    def drain() -> None:
        """What the assembler does with the frame ring: follow its commit log, read each frame's
        ``ModuleFrame`` from the slot metadata."""
        while running.is_set():
            if not follower.wait(0.1):
                continue
            taken = follower.take()
            got["frames"] += len(taken.ids) + taken.lapped
            ring = follower.ring
            for image_id in taken.ids:
                try:
                    f = ModuleFrame.unpack(ring.meta(image_id, ModuleFrame.FORMAT.size))  # type: ignore[union-attr]
                except SlotOverwritten:
                    continue
                got["complete"] += f.n_recv_packets == 128

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    args = (config.model_dump_json(), batch, coalesce, rcvbuf, ipc_dir, child)
    proc = mp.Process(target=_receiver, args=args)
    proc.start()
    try:
        _, rcvbuf, batched = parent.recv()
        me = psutil.Process(proc.pid)
        with DetectorSimulator(config, rate_hz=rate, n_images=frames) as sim:
            c0 = me.cpu_times()
            t0 = time.monotonic()
            sim.run()
            # wait until every frame is announced (or nothing moves for 3 s)
            last, since = -1, time.monotonic()
            while got["frames"] < frames and time.monotonic() - since < 3.0:
                if got["frames"] != last:
                    last, since = got["frames"], time.monotonic()
                time.sleep(0.01)
            c1 = me.cpu_times()
            wall = time.monotonic() - t0
            sent_rate = sim.achieved_rate
        drops = udp_drops(port)
        parent.send("stop")
        stats, n_fast = parent.recv()
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
        running.clear()
        drainer.join()
        follower.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    user, system = c1.user - c0.user, c1.system - c0.system
    packets = max(stats["packets"], 1)
    return {
        "batch": batch if batched else 0, "rate": sent_rate, "wall": wall, "rcvbuf": rcvbuf,
        "packets": stats["packets"], "fast": n_fast, "frames": got["frames"], "complete": got["complete"],
        "lost_frames": frames - got["complete"], "drops": drops,
        "user_us": user / packets * 1e6, "sys_us": system / packets * 1e6,
        "cpu_us": (user + system) / packets * 1e6,
        "cpu_ms_frame": (user + system) / max(got["frames"], 1) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--rate", type=float, nargs="+", default=[0.0, 1100.0], help="frames/s, 0 = max")
    parser.add_argument("--batch", type=int, nargs="+", default=[0, 128],
                        help="recvmmsg vlen, 0 = per packet")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--coalesce", type=float, nargs="+", default=[None],
                        help="seconds the batch path lets datagrams queue up (default: the receiver's)")
    parser.add_argument("--rcvbuf", type=int, default=None,
                        help="socket buffer to ask for (default: the receiver's, 100 frames)")
    parser.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    parser.add_argument("--record", action="store_true",
                        help="also write benchmarks/records/bench_receiver_cpu.json, regenerate RESULTS.md")
    args = parser.parse_args(argv)
    from _records import Record, Table, command_line, machine_info, record_and_report

    started = machine_info()
    results: list[dict[str, object]] = []
    print(f"{'rate':>8} {'batch':>5} {'sent/s':>8} {'frames':>6} {'lost':>5} {'drops':>6} {'fast%':>6} "
          f"{'user':>6} {'sys':>6} {'cpu us/pkt':>10} {'ms/frame':>8} {'coalesce':>8}")
    for rate in args.rate:
        for _ in range(args.repeat):
            for batch, coalesce in [(b, c) for b in args.batch for c in (args.coalesce if b else [None])]:
                r = run_once(batch, args.frames, rate, coalesce, args.rcvbuf)
                print(f"{rate:8.0f} {r['batch']:5d} {r['rate']:8.0f} {r['frames']:6d} {r['lost_frames']:5d} "
                      f"{r['drops']:6d} {100 * r['fast'] / max(r['packets'], 1):6.1f} {r['user_us']:6.2f} "
                      f"{r['sys_us']:6.2f} {r['cpu_us']:10.2f} {r['cpu_ms_frame']:8.3f} {coalesce}",
                      flush=True)
                results.append({"requested_rate": rate, "coalesce": coalesce, **r})
    if args.record:
        rows = [[f"{r['requested_rate']:.0f}", r["batch"], f"{r['rate']:.0f}", r["frames"], r["lost_frames"],
                 r["drops"], round(r["cpu_us"], 2), round(r["cpu_ms_frame"], 3)] for r in results]
        table = Table("Receiver CPU per packet (one Jungfrau ModuleReceiver process)",
                      ["requested/s", "batch", "sent/s", "frames", "lost", "kernel drops", "CPU µs/packet",
                       "CPU ms/frame"], rows,
                      "batch 0 = one recv_into per datagram; batch N = recvmmsg of N.")
        record_and_report(Record("bench_receiver_cpu", command_line("bench_receiver_cpu.py", argv),
                                 tables=[table], notes=list(args.note), raw={"results": results}), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
