"""EPICS buffer throughput: N PVs updating at pulse_rate/10 plus the pulse id at pulse_rate, into Redis.

Starts the simulated IOC (subprocess, private CA ports) with ``--n-bench-pvs``, runs the buffer in
this process for ``--seconds`` after every PV delivered its first value, and prints a Markdown table
row: events/s written to Redis (vs. the rate the IOC produces), bytes/s, CPU used by the buffer
process (psutil: user+system seconds per wall second, 100 % = one core) and by the IOC, and events
lost. Example::

    python benchmarks/bench_epics_buffer.py --seconds 30 --n-pvs 100 --pulse-rate 100
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
import uuid
from collections.abc import Sequence

import psutil

from daq_backend.epics.buffer import BufferConfig, EpicsBuffer
from daq_backend.epics.records import PULSE_ID_STREAM
from daq_backend.epics.sim_ioc import SCALAR_EVERY, SimIocProcess
from daq_backend.epics.store import make_store

HEADER = (
    "| date | machine | PVs x Hz + pulse Hz | s | events/s into Redis | produced/s | MB/s "
    "| buffer CPU % | IOC CPU % | lost |\n|---|---|---|---|---|---|---|---|---|---|"
)


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


def run(seconds: float, n_pvs: int, pulse_rate: float, redis_url: str | None) -> str:
    ioc = SimIocProcess(prefix=f"B{uuid.uuid4().hex[:6]}:", pulse_rate=pulse_rate, n_bench_pvs=n_pvs)
    os.environ.update(ioc.client_env)  # caproto clients read their addressing from the environment
    prefix = f"bench_epics_buffer:{uuid.uuid4().hex}:"
    pv_list = [ioc.pv(f"BENCH:{i:03d}") for i in range(n_pvs)]
    store = make_store(redis_url)
    ioc.start()
    buffer = EpicsBuffer(
        BufferConfig(
            pulse_id_pv=ioc.pv("PULSE_ID"), pv_list=pv_list, stream_prefix=prefix, stats_interval_s=3600
        ),
        store,
        service_name="bench",
    )
    try:
        buffer.start()
        deadline = time.monotonic() + 120
        while sum(store.redis.exists(prefix + pv) for pv in pv_list) < n_pvs:
            if time.monotonic() > deadline:
                raise RuntimeError("PVs did not connect within 120 s")
            time.sleep(0.2)
        me, ioc_process = psutil.Process(), psutil.Process(ioc.process.pid)  # type: ignore[union-attr]
        before = buffer.counters.snapshot()
        wall0, cpu0, ioc_cpu0 = time.monotonic(), cpu_seconds(me), cpu_seconds(ioc_process)
        pulses0 = store.redis.xlen(prefix + PULSE_ID_STREAM)
        time.sleep(seconds)
        after = buffer.counters.snapshot()
        wall = time.monotonic() - wall0
        cpu, ioc_cpu = cpu_seconds(me) - cpu0, cpu_seconds(ioc_process) - ioc_cpu0
        pulses = store.redis.xlen(prefix + PULSE_ID_STREAM) - pulses0
    finally:
        buffer.stop()
        ioc.close()
        keys = list(store.redis.scan_iter(match=prefix + "*"))
        if keys:
            store.redis.delete(*keys)
        store.close()
    n_events = after["n_events"] - before["n_events"]
    n_bytes = after["n_bytes"] - before["n_bytes"]
    produced = n_pvs * pulse_rate / SCALAR_EVERY + pulse_rate
    lost = after["n_dropped"] - before["n_dropped"]
    machine = f"{psutil.cpu_count()} x {cpu_model()}"
    return (
        f"| {datetime.date.today()} | {machine} | {n_pvs} x {pulse_rate / SCALAR_EVERY:g} + {pulse_rate:g} "
        f"| {wall:.0f} | {n_events / wall:.0f} | {produced:.0f} (pulse ids stored: {pulses / wall:.0f}/s) "
        f"| {n_bytes / wall / 1e6:.3f} | {100 * cpu / wall:.1f} | {100 * ioc_cpu / wall:.1f} | {lost} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--n-pvs", type=int, default=100)
    parser.add_argument("--pulse-rate", type=float, default=100.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="or 'embedded'")
    parser.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    parser.add_argument("--record", action="store_true",
                        help="also write benchmarks/records/bench_epics_buffer.json, regenerate RESULTS.md")
    args = parser.parse_args(argv)
    from _records import Record, command_line, machine_info, record_and_report, table_from_markdown

    started = machine_info()
    row = run(args.seconds, args.n_pvs, args.pulse_rate, args.redis_url)
    print(HEADER)
    print(row)
    if args.record:
        table = table_from_markdown("EPICS buffer into Redis", HEADER, [row])
        record_and_report(Record("bench_epics_buffer", command_line("bench_epics_buffer.py", argv),
                                 tables=[table], notes=list(args.note)), started)


if __name__ == "__main__":
    main()
