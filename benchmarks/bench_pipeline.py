"""Side-by-side throughput benchmark: loopback limit, C++ ``slsReceiver``, and this project's pipeline.

In one run, fed by the same slsDetectorPackage virtual Jungfrau (1 module, 1 MiB frames), at each
period (default 10, 2, 1 ms and free-running = 0) plus one sustained run (default 10,000 frames), each
with the machine's socket-buffer cap and with ``net.core.rmem_max`` raised to 2 GiB (always restored):

* ``drain``: the virtual server's own send rate with nothing but a C ``recvmmsg`` drain receiving;
* ``slsReceiver``: the C++ reference receiver writing binary files to /dev/shm;
* ``ours``: receiver -> sync/assembler -> writer agent -> h5 writer -> HDF5 on /dev/shm, one process
  each under the project's supervisor, the file requested for exactly the frame count.

Our rings hold as many frames as slsReceiver's fifo (2500). The VM's memory is *backed* for the run
by default (free page reporting off, pages touched once, restored afterwards; ``_vmmem.py`` says why),
``--vm-memory as-is`` leaves it alone.

Then the multi-module case with the built-in simulator (4-module Jungfrau, Eiger, GigaFRoST 128x480):
the rate is stepped up until frames are lost, and the highest lossless rate is reported.

For every run: the sender's achieved rate, frames caught / written / lost (counted from the output
files), wall rate, CPU seconds per frame and RSS of every process (the virtual server included), the
kernel's socket drops and buffer size, and the CPU other programs used meanwhile (noise). Each point is
repeated ``--repeats`` times (variant order rotated) and reported as median (min–max). Before each
multi-module detector's steps the simulator's own ceiling is measured (free-running, nothing
receiving, 1 s) and reported beside its steps. Output: ``benchmarks/out/<timestamp>.{md,json,png}``;
``--record`` also writes ``benchmarks/records/bench_pipeline.json`` and the plot
``benchmarks/bench_pipeline.png``, then regenerates ``RESULTS.md`` and the README table
(``report.py``).

    python benchmarks/bench_pipeline.py --repeats 2        # the recorded run (about 18 min on 2 cores)
    python benchmarks/bench_pipeline.py --quick            # a few hundred frames per point
    python benchmarks/bench_pipeline.py --quick --variants ours --buffers default --no-multi

Needs root for the large-buffer half (or ``--buffers default``) and for backed VM memory (or
``--vm-memory as-is``), the slsDetectorPackage binaries
(built on first use, see ``daq_backend.control.sls_build``) and a C compiler for the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from _drain import UdpDrain  # noqa: E402
from _net import free_udp_base, udp_socket_stats  # noqa: E402
from _ours import OurPipeline, read_h5_counts  # noqa: E402
from _procmon import ProcessMonitor  # noqa: E402
from _records import Record, machine_info, write_record  # noqa: E402
from _report import (  # noqa: E402
    BASELINE,
    SCHEMA,
    VARIANTS,
    RunResult,
    machine_facts,
    parse_sender_report,
    write_outputs,
)
from _rmem import (  # noqa: E402
    DEFAULT_SOCKET_RCVBUF,
    LARGE_RMEM_MAX,
    MAX_SOCKET_RCVBUF,
    BenchmarkInterrupted,
    read_rmem_max,
    signals_raise,
    socket_buffer_cap,
)
from _sls import (  # noqa: E402
    JUNGFRAU_FRAME_BYTES,
    JUNGFRAU_PACKETS_PER_FRAME,
    VirtualJungfrau,
    configure_sls_output,
    read_sls_files,
    scalar,
    sls_frames_on_disk,
)
from _vmmem import backed_memory  # noqa: E402
from bench_sender import measure as measure_sender  # noqa: E402

from daq_backend.broker import EmbeddedBrokerHub  # noqa: E402
from daq_backend.config import DetectorConfig, load_config, parse_config  # noqa: E402
from daq_backend.control.virtual import SlsReceiverProcess  # noqa: E402
from daq_backend.formats import ImageStatus  # noqa: E402

log = logging.getLogger("bench_pipeline")

REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
#: The built-in simulator with its own clock readings (``std-daq simulate`` prints only a summary):
#: argv = config, rate, images; prints one JSON line when done.
SIMULATOR_CODE = """
import json, sys, time
from daq_backend.config import load_config
from daq_backend.simulator.sender import DetectorSimulator
config = load_config(sys.argv[1])
with DetectorSimulator(config, rate_hz=float(sys.argv[2]), n_images=int(sys.argv[3])) as sim:
    start = time.monotonic()
    sim.run()
    end = time.monotonic()
print(json.dumps({"sent": sim.n_sent_images, "start": start, "end": end, "slips": sim.n_schedule_slips,
                  "summary": sim.summary()}))
"""
#: The multi-module detectors and the rates (Hz) each is stepped through.
MULTI_DETECTORS: dict[str, tuple[str, tuple[float, ...]]] = {
    "jungfrau_4m": ("configs/jungfrau_4m.json", (25, 50, 100, 200, 400, 800)),
    "eiger_0_5m": ("configs/eiger_0_5m.json", (100, 200, 400, 800, 1600, 3200)),
    "gigafrost_128x480": ("configs/gigafrost_128x480.json", (500, 1000, 2000, 4000, 8000, 16000)),
}


@dataclass
class Plan:
    periods_ms: list[float]
    frames: int
    sustained: int
    sustained_period_ms: float
    repeats: int
    buffers: list[str]
    variants: list[str]
    large_rmem_max: int
    rcvbuf: int
    settle_s: float
    multi: list[str]
    multi_step_s: float
    multi_min_frames: int
    multi_max_bytes: int
    multi_max_steps: int
    work_root: Path
    vm_memory: str = "backed"
    sender_probe_s: float = 1.0
    touch_gib: float = 0.0
    notes: list[str] = field(default_factory=list)

    def points(self) -> list[tuple[float, int, bool]]:
        """(period ms, frames, sustained) of every Jungfrau point, sustained last."""
        pts = [(p, self.frames, False) for p in self.periods_ms]
        if self.sustained > 0:
            pts.append((self.sustained_period_ms, self.sustained, True))
        return pts


def rate_of(period_ms: float) -> float:
    return 0.0 if period_ms == 0 else 1000.0 / period_ms


class PipelineBenchmark:
    """Owns every process and file of one benchmark run; ``run()`` returns the result document."""

    def __init__(self, plan: Plan, command: str, logs_dir: Path | None = None) -> None:
        self.plan = plan
        self.command = command
        self.logs_dir = logs_dir
        self.runs: list[RunResult] = []
        self.multi: list[dict[str, Any]] = []
        self.monitor = ProcessMonitor()
        self.work = Path(tempfile.mkdtemp(prefix="std-daq-bench-", dir=plan.work_root))
        # unix socket paths must be short: not under the work dir
        self.ipc_dir = Path(tempfile.mkdtemp(prefix="sdqbench-", dir="/tmp"))
        self.hub: EmbeddedBrokerHub | None = None
        self.jungfrau: VirtualJungfrau | None = None
        self.sls: SlsReceiverProcess | None = None
        self.sls_port = 0
        self.original_rmem_max = read_rmem_max()
        self.facts: dict[str, Any] = {}
        self.interrupted: str | None = None

    # -- orchestration -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        plan = self.plan
        previous_ipc_dir = os.environ.get("STD_DAQ_IPC_DIR")
        os.environ["STD_DAQ_IPC_DIR"] = str(self.ipc_dir)
        self.facts = machine_facts(self.original_rmem_max)
        with contextlib.ExitStack() as stack:
            stack.callback(self._cleanup)
            self.monitor.start()
            self.monitor.add("harness", os.getpid())
            self.hub = EmbeddedBrokerHub(f"bench-{uuid.uuid4().hex[:8]}")
            self.hub.start()
            if plan.vm_memory == "backed":
                self.facts["vm_memory"] = stack.enter_context(backed_memory(plan.touch_gib, plan.work_root))
            else:
                self.facts["vm_memory"] = "as the machine has it (no change)"
            try:
                for buffer in plan.buffers:
                    target = None if buffer == "default" else plan.large_rmem_max
                    with socket_buffer_cap(target) as cap:
                        log.info("== socket buffers: %s (net.core.rmem_max = %d)", buffer, cap)
                        self._jungfrau_points(buffer, cap)
                        self._multi_module(buffer, cap)
            except (KeyboardInterrupt, BenchmarkInterrupted) as exc:
                self.interrupted = str(exc) or type(exc).__name__
                log.error("interrupted (%s): writing the results so far", self.interrupted)
        if previous_ipc_dir is None:
            os.environ.pop("STD_DAQ_IPC_DIR", None)
        else:
            os.environ["STD_DAQ_IPC_DIR"] = previous_ipc_dir
        self.facts["loadavg_end"] = list(os.getloadavg())
        self.facts["rmem_max_after"] = read_rmem_max()
        notes = list(plan.notes)
        if self.interrupted:
            notes.append(f"INTERRUPTED ({self.interrupted}): results are partial")
        return {"schema": SCHEMA, "command": self.command, "machine": self.facts, "plan": _plan_dict(plan),
                "runs": [r.to_dict() for r in self.runs], "multi": self.multi, "notes": notes}

    def _jungfrau_points(self, buffer: str, cap: int) -> None:
        plan = self.plan
        jungfrau_variants = [v for v in plan.variants if v in VARIANTS]
        if not jungfrau_variants:
            return
        self._ensure_jungfrau()
        for period_ms, frames, sustained in plan.points():
            for repeat in range(plan.repeats):
                order = jungfrau_variants[repeat % len(jungfrau_variants):] + \
                    jungfrau_variants[:repeat % len(jungfrau_variants)]
                for variant in order:
                    result = RunResult(case="jungfrau", variant=variant, buffer=buffer, rmem_max=cap,
                                       requested_rate_hz=rate_of(period_ms), frames=frames, repeat=repeat,
                                       period_ms=period_ms, sustained=sustained,
                                       frame_bytes=JUNGFRAU_FRAME_BYTES)
                    runner = {"drain": self._run_drain, "slsReceiver": self._run_sls,
                              "ours": self._run_ours_jungfrau}[variant]
                    self._attempt(result, lambda r=result, f=runner: f(r, cap))  # type: ignore[misc]

    def _attempt(self, result: RunResult, body: Callable[[], None]) -> None:
        """Run one measurement; a failure is recorded with the result, not fatal to the benchmark."""
        label = (f"{result.case} {result.variant} {result.buffer} rate={result.requested_rate_hz:g} "
                 f"frames={result.frames} repeat={result.repeat}")
        log.info("-- %s", label)
        try:
            body()
        except (KeyboardInterrupt, BenchmarkInterrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - one failed point must not lose the others
            log.exception("%s failed", label)
            result.error = f"{type(exc).__name__}: {str(exc)[:2000]}"
        self.runs.append(result)
        if result.error is None:
            log.info("   sent %.0f/s, good %d/%d (lost %.2f %%), written/s %.0f, CPU %.3f ms/frame",
                     result.send_rate_hz, result.good, result.frames, result.lost_pct, result.wall_rate_hz,
                     result.cpu_ms_per_frame)

    # -- shared sources ------------------------------------------------------------------------------
    def _ensure_jungfrau(self) -> None:
        if self.jungfrau is not None:
            return
        log.info("starting the virtual Jungfrau (about 10 s)")
        self.jungfrau = VirtualJungfrau(self.work)  # assigned first: a half-started server is cleaned up too
        self.jungfrau.start()
        self.monitor.add("vserver", self.jungfrau.pid)
        if self.jungfrau.stop_server_pid:
            self.monitor.add("vserver-stop", self.jungfrau.stop_server_pid)
        self.facts["slsdet_package_version"] = self.jungfrau.version()

    def _ensure_sls(self) -> SlsReceiverProcess:
        if self.sls is None:
            self.sls = SlsReceiverProcess(log_path=self.work / "slsReceiver.log")
            self.sls.start()
            self.sls_port = free_udp_base(1)
            self.monitor.add("slsReceiver", self.sls.pid or 0)
        return self.sls

    def _cleanup(self) -> None:
        if self.jungfrau is not None:
            self.jungfrau.close()
            self.jungfrau = None
        if self.sls is not None:
            self.sls.cleanup()
            self.sls = None
        if self.hub is not None:
            self.hub.stop()
            self.hub = None
        self.monitor.stop()
        if self.logs_dir is not None and any(r.error for r in self.runs):
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            for log_file in self.work.rglob("*.log"):
                shutil.copyfile(log_file, self.logs_dir / log_file.name)
            log.warning("runs failed: process logs kept in %s", self.logs_dir)
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def _finish(self, result: RunResult, names: list[str], t0: float, t_end: float,
                sender_end: float) -> None:
        """CPU/RSS of ``names`` over the run, and the CPU everything else on the machine used."""
        end = max(t_end, sender_end)
        watched = 0.0
        for name in names:
            usage = self.monitor.usage(name, t0, end)
            if usage is not None:
                result.procs[name] = usage.to_dict()
                watched += usage.cpu_s
        harness = self.monitor.usage("harness", t0, end)
        if harness is not None:
            result.procs["harness"] = harness.to_dict()
            watched += harness.cpu_s
        result.foreign_cpu_s = round(max(0.0, self.monitor.machine_cpu(t0, end) - watched), 3)
        result.send_rate_hz = result.frames / result.send_wall_s if result.send_wall_s > 0 else 0.0
        result.wall_s = max(0.0, t_end - t0)

    def _vserver_names(self) -> list[str]:
        return ["vserver", "vserver-stop"]

    # -- (a) the loopback limit ----------------------------------------------------------------------
    def _run_drain(self, result: RunResult, cap: int) -> None:
        jf = self._jungfrau()
        port = free_udp_base(1)
        drain = UdpDrain(port, min(self.plan.rcvbuf, cap), JUNGFRAU_PACKETS_PER_FRAME).start()
        try:
            self.monitor.add("drain", drain.pid)
            jf.send_to(port)
            jf.configure(result.frames, (result.period_ms or 0) / 1000)
            jf.reset_frame_number()
            t0 = self.monitor.sample()
            t_idle = jf.acquire(timeout=self._acquire_timeout(result))
            stats = self._wait_socket_drained(port)
            counts = drain.finish()
        finally:
            drain.kill()
        if stats is not None:
            result.kernel_drops, result.rcvbuf = stats.drops, stats.rcvbuf
        result.send_wall_s = t_idle - t0
        result.caught = counts.frames_seen
        result.good = min(result.frames, counts.frames_complete)
        t_end = counts.last if counts.packets else t_idle
        if counts.packets and counts.span > 0:
            rate = counts.frames_seen / counts.span
            result.notes.append(f"drain first->last packet rate {rate:.1f} frames/s")
        self._finish(result, ["drain", *self._vserver_names()], t0, t_end, t_idle)
        self.monitor.remove("drain")

    def _wait_socket_drained(self, port: int, timeout: float = 30.0) -> Any:
        """Kernel stats of ``port`` once its receive queue is empty (the receiver read everything)."""
        deadline = time.monotonic() + timeout
        stats = udp_socket_stats(port)
        while stats is not None and stats.recv_q > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = udp_socket_stats(port)
        return stats

    # -- (b) slsReceiver -----------------------------------------------------------------------------
    def _run_sls(self, result: RunResult, cap: int) -> None:
        jf = self._jungfrau()
        rx = self._ensure_sls()
        folder = self.work / f"sls-{uuid.uuid4().hex[:8]}"
        try:
            jf.send_to(self.sls_port, rx)
            det = jf.det
            # slsReceiver refuses a size it does not get (it uses SO_RCVBUF only): ask for what the cap allows
            configure_sls_output(det, folder, min(self.plan.rcvbuf, cap))
            jf.configure(result.frames, (result.period_ms or 0) / 1000)
            jf.reset_frame_number()
            det.rx_start()
            with GrowthWatcher(lambda: sls_frames_on_disk(folder)) as on_disk:
                t0 = self.monitor.sample()
                t_idle = jf.acquire(timeout=self._acquire_timeout(result))
                on_disk_before, t_end = self._wait_quiet(on_disk, result.frames)
            stats = udp_socket_stats(self.sls_port)
            det.rx_stop()  # returns once its fifo is written out
            t_stopped = time.monotonic()
            files = read_sls_files(folder)
            result.caught = scalar(det.rx_framescaught)
            result.missing_packets = scalar(det.rx_missingpackets)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if files.frames > on_disk_before:  # the rest reached the disk only during rx_stop
            t_end = t_stopped
            result.notes.append(f"{files.frames - on_disk_before} frames reached the disk during rx_stop")
        if stats is not None:
            result.kernel_drops, result.rcvbuf = stats.drops, stats.rcvbuf
        result.send_wall_s = t_idle - t0
        result.written = files.frames
        result.good = min(result.frames, files.complete)
        self._finish(result, ["slsReceiver", *self._vserver_names()], t0, t_end, t_idle)

    def _wait_quiet(self, on_disk: GrowthWatcher, frames: int) -> tuple[int, float]:
        """Wait until the files hold every frame or nothing was added for ``settle`` s; returns the
        frames on disk and when the last of them arrived."""
        while True:
            count, last_change = on_disk.value, on_disk.last_change
            if count >= frames or time.monotonic() - last_change > self.plan.settle_s:
                return count, last_change
            time.sleep(0.05)

    # -- (c) ours ------------------------------------------------------------------------------------
    def _pipeline(self, config: DetectorConfig, cap: int) -> OurPipeline:
        assert self.hub is not None
        # As root the receiver would use SO_RCVBUFFORCE and ignore the cap: ask for no more than the cap,
        # so "default" means for ours what it means for slsReceiver and the drain.
        rcvbuf = min(self.plan.rcvbuf, cap)
        pipeline = OurPipeline(config, self.work / "pipeline", self.hub.broker_url, rcvbuf=rcvbuf,
                               output_root=self.work)
        try:
            pipeline.start()
        except BaseException:
            pipeline.stop()
            raise
        for name, pid in pipeline.pids().items():
            self.monitor.add(name, pid)
        return pipeline

    def _run_ours_jungfrau(self, result: RunResult, cap: int) -> None:
        jf = self._jungfrau()
        config = jungfrau_config()
        h5 = self.work / f"ours-{uuid.uuid4().hex[:8]}.h5"
        pipeline = self._pipeline(config, cap)
        names = list(pipeline.pids())
        try:
            jf.send_to(config.start_udp_port)
            jf.configure(result.frames, (result.period_ms or 0) / 1000)
            jf.reset_frame_number()
            request_id = pipeline.begin_write(result.frames, h5)
            t0 = self.monitor.sample()
            t_idle = jf.acquire(timeout=self._acquire_timeout(result))
            outcome = pipeline.wait_written(request_id, result.frames, lambda: True, self.plan.settle_s)
            done_wall = time.time()
            stats = udp_socket_stats(config.start_udp_port)
            counters = pipeline.counters(not_before=done_wall)
            result.notes += [f"{name} was restarted {n} times: {pipeline.log_tail(500)}"
                             for name, n in pipeline.restarts().items()]
            result.send_wall_s = t_idle - t0
            self._finish(result, [*names, *self._vserver_names()], t0, outcome.t_end, t_idle)
        finally:
            pipeline.stop()
            for name in names:
                self.monitor.remove(name)
        try:
            counts = read_h5_counts(h5, range(1, result.frames + 1))
        finally:
            h5.unlink(missing_ok=True)
        self._ours_counts(result, counters, counts, stats)

    @staticmethod
    def _ours_counts(result: RunResult, counters: dict[str, dict[str, int]], counts: Any, stats: Any) -> None:
        receivers = [c for name, c in counters.items() if name.startswith("receiver")]
        assembler = counters.get("assembler", {})
        if receivers:
            result.missing_packets = sum(int(c.get("missing_packets", 0)) for c in receivers)
        # an image counts as caught when the assembler emitted it (any module, any packet)
        result.caught = int(assembler.get("images", 0)) or None
        result.written = counts.rows
        result.good = counts.good
        if stats is not None:
            result.kernel_drops, result.rcvbuf = stats.drops, stats.rcvbuf
        if counts.duplicate_ids:
            result.notes.append(f"{counts.duplicate_ids} duplicate image ids in the file")
        if counts.bad_status:
            result.notes.append("rows by bad status: " + ", ".join(
                f"{ImageStatus(s).name.lower()} {n}" for s, n in sorted(counts.bad_status.items())))

    def _jungfrau(self) -> VirtualJungfrau:
        self._ensure_jungfrau()
        assert self.jungfrau is not None
        return self.jungfrau

    def _acquire_timeout(self, result: RunResult) -> float:
        nominal = result.frames * max(result.period_ms or 0.0, 1.0) / 1000
        return 10 * nominal + 120

    # -- multi-module with the built-in simulator ----------------------------------------------------
    def _multi_module(self, buffer: str, cap: int) -> None:
        plan = self.plan
        for name in plan.multi:
            path, rates = MULTI_DETECTORS[name]
            base = load_config(REPO / path)
            entry: dict[str, Any] = {
                "detector": name, "config": path, "buffer": buffer, "modules": len(base.required_modules),
                "image": f"{base.image_pixel_height}x{base.image_pixel_width}x{base.bit_depth}bit",
                "steps": [], "best": None, "stopped_because": "all steps lossless",
            }
            self.multi.append(entry)
            try:
                ceiling = measure_sender(base, "unread", None, plan.sender_probe_s)
                entry["sender_ceiling_hz"] = ceiling["images_per_s"]
                entry["sender_ceiling"] = ceiling
                log.info("   simulator ceiling for %s: %.0f images/s", name, ceiling["images_per_s"])
            except Exception as exc:  # noqa: BLE001 - the steps are still worth running
                log.exception("measuring the simulator ceiling failed")
                entry["sender_ceiling_error"] = f"{type(exc).__name__}: {exc}"
            for rate in rates[: plan.multi_max_steps]:
                frames = int(max(plan.multi_min_frames,
                                 min(rate * plan.multi_step_s, plan.multi_max_bytes // base.image_nbytes)))
                result = RunResult(case=f"multi:{name}", variant="ours", buffer=buffer, rmem_max=cap,
                                   requested_rate_hz=float(rate), frames=frames,
                                   frame_bytes=base.image_nbytes)
                self._attempt(result, lambda r=result, b=base: self._run_multi_step(r, b, cap))  # type: ignore[misc]
                step = {"requested_rate_hz": float(rate), "frames": frames,
                        "send_rate_hz": result.send_rate_hz, "lost": result.lost, "error": result.error,
                        "sender_slips": result.sender_slips}
                entry["steps"].append(step)
                if result.error is not None:
                    entry["stopped_because"] = f"step {rate:g} Hz failed"
                    break
                if result.lost > 0:
                    entry["stopped_because"] = f"{result.lost} frames lost at {rate:g} Hz"
                    break
                entry["best"] = {
                    "requested_rate_hz": float(rate), "send_rate_hz": result.send_rate_hz,
                    "gbps": result.send_rate_hz * base.image_nbytes / 1e9,
                    "cpu_ms_per_frame": result.cpu_ms_per_frame, "cores_per_gbps": result.cores_per_gbps,
                }
                if result.send_rate_hz < 0.8 * rate:
                    entry["stopped_because"] = (f"the simulator reached only {result.send_rate_hz:.0f} of "
                                                f"{rate:g} Hz")
                    break

    def _run_multi_step(self, result: RunResult, base: DetectorConfig, cap: int) -> None:
        config = fresh_config(base)
        config_path = self.work / f"{config.detector_name}-sim.json"
        config_path.write_text(json.dumps(config.to_json_dict()))
        h5 = self.work / f"multi-{uuid.uuid4().hex[:8]}.h5"
        pipeline = self._pipeline(config, cap)
        names = list(pipeline.pids())
        sim: subprocess.Popen[str] | None = None
        try:
            request_id = pipeline.begin_write(result.frames, h5)
            sim = subprocess.Popen(
                [sys.executable, "-c", SIMULATOR_CODE, str(config_path), str(result.requested_rate_hz),
                 str(result.frames)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            self.monitor.add("simulator", sim.pid)
            proc = sim
            outcome = pipeline.wait_written(request_id, result.frames, lambda: proc.poll() is not None,
                                            self.plan.settle_s)
            out, _ = sim.communicate(timeout=60)
            report = parse_sender_report(out)
            if report.sent != result.frames:
                raise RuntimeError(f"the simulator sent {report.sent} of {result.frames} images: "
                                   f"{out[-500:]}")
            t0, seconds = report.start, report.seconds  # its start-up (imports, patterns) is not the run
            done_wall = time.time()
            stats = [udp_socket_stats(config.udp_port(m)) for m in config.required_modules]
            counters = pipeline.counters(not_before=done_wall)
            result.notes += [f"{name} was restarted {n} times: {pipeline.log_tail(500)}"
                             for name, n in pipeline.restarts().items()]
            result.send_wall_s = seconds
            result.sender_slips = report.slips
            self._finish(result, [*names, "simulator"], t0, outcome.t_end, t0 + seconds)
        finally:
            if sim is not None and sim.poll() is None:
                sim.kill()
                sim.wait()
            pipeline.stop()
            for name in [*names, "simulator"]:
                self.monitor.remove(name)
        try:
            counts = read_h5_counts(h5, range(1, result.frames + 1))
        finally:
            h5.unlink(missing_ok=True)
            config_path.unlink(missing_ok=True)
        self._ours_counts(result, counters, counts, None)
        good_stats = [s for s in stats if s is not None]
        if good_stats:
            result.kernel_drops = sum(s.drops for s in good_stats)
            result.rcvbuf = min(s.rcvbuf for s in good_stats)


class GrowthWatcher:
    """Polls a counter in a thread during the run and remembers when it last grew: the moment the
    last frame reached the disk, independent of when the harness gets round to looking."""

    def __init__(self, read: Callable[[], int], interval: float = 0.02) -> None:
        self._read = read
        self.interval = interval
        self.value = read()
        self.last_change = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="growth-watcher", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            if value != self.value:
                self.value, self.last_change = value, time.monotonic()

    def __enter__(self) -> GrowthWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


#: Our rings hold as many frames as slsReceiver's fifo (``rx_fifodepth`` 2500 for Jungfrau): the same
#: memory to absorb a writer that falls behind. The receiver (realtime priority) is rarely behind, so
#: most of it is image ring, where the writer's backlog waits.
FRAME_RING_SLOTS, IMAGE_RING_SLOTS = 500, 2000


def jungfrau_config() -> DetectorConfig:
    """A one-module Jungfrau as the virtual server sends it, under a fresh name and UDP port."""
    return parse_config({
        "detector_name": f"bench{uuid.uuid4().hex[:8]}", "detector_type": "jungfrau", "n_modules": 1,
        "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
        "start_udp_port": free_udp_base(1), "image_id_source": "auto",
        "frame_ring_slots": FRAME_RING_SLOTS, "image_ring_slots": IMAGE_RING_SLOTS,
    })


def fresh_config(base: DetectorConfig) -> DetectorConfig:
    """``base`` under a fresh name and free UDP ports (runs never meet leftovers of another)."""
    data = base.to_json_dict()
    data["detector_name"] = f"bench{uuid.uuid4().hex[:8]}"
    data["start_udp_port"] = free_udp_base(base.n_modules, random.Random())
    return parse_config(data)


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.__dict__.items() if k != "notes"}


# -- command line ------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [p.strip() for p in text.split(",") if p.strip()]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_pipeline.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="few frames per point (200, sustained 1000), 1 repeat, 3 multi-module steps")
    p.add_argument("--periods", type=_floats, default=None, help="frame periods in ms, 0 = free-running "
                   "(default 10,2,1,0)")
    p.add_argument("--frames", type=int, default=None, help="frames per point (default 2000; quick 200)")
    p.add_argument("--sustained", type=int, default=None,
                   help="frames of the sustained run, 0 = none (default 10000; quick 1000)")
    p.add_argument("--sustained-period", type=float, default=1.0, help="its period in ms (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per point (default 3; quick 1)")
    p.add_argument("--buffers", type=_choices(("default", "large")), default=["default", "large"],
                   help="socket-buffer modes: default (the machine's rmem_max), large (rmem_max raised)")
    p.add_argument("--variants", type=_choices(VARIANTS), default=list(VARIANTS),
                   help="Jungfrau variants to run (default drain,slsReceiver,ours)")
    p.add_argument("--multi", type=_choices(tuple(MULTI_DETECTORS)), default=list(MULTI_DETECTORS),
                   help="multi-module detectors (default all)")
    p.add_argument("--no-multi", action="store_true", help="skip the multi-module case")
    p.add_argument("--multi-steps", type=int, default=None, help="at most this many rate steps (quick 3)")
    p.add_argument("--large-rmem-max", type=int, default=LARGE_RMEM_MAX,
                   help="net.core.rmem_max for the large-buffer runs (default 2 GiB - 1)")
    p.add_argument("--rcvbuf", type=int, default=DEFAULT_SOCKET_RCVBUF,
                   help="socket receive buffer every receiver asks for, capped by rmem_max (default "
                        "1000 MiB, slsReceiver's Jungfrau default; at most 1 GiB - 1, the kernel's limit)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds without new output after the sender ended before a run counts as over")
    p.add_argument("--vm-memory", choices=("backed", "as-is"), default="backed",
                   help="backed (default): switch a VM's free page reporting off for the run and touch "
                        "--touch-gib of memory first, so writes cost what they cost on bare metal (see "
                        "_vmmem.py); as-is: leave the machine alone (every run pays fresh-page faults)")
    p.add_argument("--touch-gib", type=float, default=None,
                   help="GiB to touch with --vm-memory backed (default: the largest run's output + 6)")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm"), help="where output files go")
    p.add_argument("--out", type=Path, default=None,
                   help="output base path (default benchmarks/out/<timestamp>); .md/.json/.png are added")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also run our pipeline at git revision REV (its own bench_pipeline.py from a "
                        "temporary worktree, same points, after this run) and compare CPU per frame")
    p.add_argument("--record-as", default="bench_pipeline", metavar="NAME",
                   help="record name (benchmarks/records/NAME.json; default bench_pipeline), e.g. "
                        "bench_pipeline_asis for a --vm-memory as-is run reported beside the backed one")
    p.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    p.add_argument("--record", action="store_true",
                   help="also write benchmarks/records/bench_pipeline.json and the plot "
                        "benchmarks/bench_pipeline.png, then regenerate RESULTS.md and the README table")
    p.add_argument("--log-level", default="INFO")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    plan = Plan(
        periods_ms=args.periods if args.periods is not None else [10.0, 2.0, 1.0, 0.0],
        frames=args.frames if args.frames is not None else (200 if quick else 2000),
        sustained=args.sustained if args.sustained is not None else (1000 if quick else 10000),
        sustained_period_ms=args.sustained_period,
        repeats=args.repeats if args.repeats is not None else (1 if quick else 3),
        buffers=args.buffers, variants=args.variants, large_rmem_max=args.large_rmem_max, rcvbuf=args.rcvbuf,
        settle_s=args.settle, multi=[] if args.no_multi else args.multi,
        multi_step_s=1.0 if quick else 3.0, multi_min_frames=100 if quick else 300,
        multi_max_bytes=(256 if quick else 2048) * 2**20,
        multi_max_steps=args.multi_steps if args.multi_steps is not None else (3 if quick else 6),
        work_root=args.workdir, vm_memory=args.vm_memory,
    )
    largest = max(plan.frames, plan.sustained) * JUNGFRAU_FRAME_BYTES / 2**30
    room = shutil.disk_usage(plan.work_root).free / 2**30 * 0.9  # tmpfs: its size limit
    plan.touch_gib = args.touch_gib if args.touch_gib is not None else round(min(largest + 6, room), 1)
    if plan.frames < 1 or plan.repeats < 1 or plan.sustained < 0:
        raise SystemExit("bench_pipeline.py: --frames and --repeats must be >= 1, --sustained >= 0")
    if not 0 < plan.rcvbuf <= MAX_SOCKET_RCVBUF:
        raise SystemExit(f"bench_pipeline.py: --rcvbuf must be 1..{MAX_SOCKET_RCVBUF}, got {plan.rcvbuf}")
    if quick:
        plan.notes.append("--quick: too few frames for stable numbers; for development only")
    plan.notes += list(getattr(args, "note", []) or [])
    return plan


def baseline_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """The points of this run for the baseline's benchmark: our pipeline only, no multi-module."""
    argv = ["--variants", "ours", "--no-multi", "--buffers", ",".join(args.buffers),
            "--vm-memory", "as-is", "--workdir", str(args.workdir), "--out", str(out),
            "--settle", str(args.settle), "--sustained-period", str(args.sustained_period)]
    for flag, value in (("--periods", args.periods), ("--frames", args.frames),
                        ("--sustained", args.sustained), ("--repeats", args.repeats)):
        if value is not None:
            argv += [flag, ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)]
    return ["--quick", *argv] if args.quick else argv


def add_baseline(doc: dict[str, Any], args: argparse.Namespace, out_base: Path) -> None:
    """Run revision ``args.baseline``'s own benchmark for our pipeline from a temporary git worktree
    (its code on PYTHONPATH ahead of this tree's), and add its runs to ``doc`` as variant
    ``baseline``. A failure is a note, not fatal: this run's results stand."""
    rev = args.baseline
    work = Path(tempfile.mkdtemp(prefix="std-daq-baseline-"))
    tree = work / "tree"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", f"{rev}^{{commit}}"],
                                check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True, text=True)
        out = work / "baseline"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        log.info("== baseline %s (%s): %s", rev, commit, " ".join(baseline_argv(args, out)))
        proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_pipeline.py"),
                               *baseline_argv(args, out)], cwd=tree, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stdout[-1500:]}")
        base_doc = json.loads(out.with_suffix(".json").read_text())
        for run in base_doc.get("runs", []):
            if run.get("variant") == "ours":
                run["variant"] = BASELINE
                doc["runs"].append(run)
        doc["baseline"] = {"rev": rev, "commit": commit, "command": base_doc.get("command", "")}
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        log.error("baseline %s failed: %s", rev, detail)
        doc["notes"].append(f"baseline {rev} failed: {str(detail)[:1500]}")
    finally:
        if tree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True, text=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not re.fullmatch(r"bench_pipeline(_[A-Za-z0-9]+)*", args.record_as):
        raise SystemExit(f"bench_pipeline.py: --record-as must be bench_pipeline or bench_pipeline_<suffix>, "
                         f"got {args.record_as!r}")
    plan = make_plan(args)
    command = "python benchmarks/bench_pipeline.py " + " ".join(shlex.quote(a) for a in
                                                                 (sys.argv[1:] if argv is None else argv))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_base = args.out or OUT_DIR / stamp
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = machine_info()  # the commit that runs and the load, taken before the run
    with signals_raise():
        bench = PipelineBenchmark(plan, command.strip(), logs_dir=out_base.with_name(out_base.name + "-logs"))
        doc = bench.run()
        if args.baseline and not bench.interrupted:
            add_baseline(doc, args, out_base)
        json_path, md_path, markdown = write_outputs(doc, out_base)
        png_path = out_base.with_suffix(".png")
        from plot import render_plot

        render_plot(doc, png_path)
        print(markdown)
        print(f"results: {md_path}\n         {json_path}\n         {png_path}")
        if args.record:
            plot_path = BENCH_DIR / f"{args.record_as}.png"
            shutil.copyfile(png_path, plot_path)
            record = Record(args.record_as, doc["command"], raw=doc)  # its notes are in doc
            print(f"recorded in {write_record(record, started)} and {plot_path}")
            import report

            report.main([])
    return 130 if bench.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
