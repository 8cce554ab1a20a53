"""Latency and constant-memory benchmark: two targets of the performance issue no other benchmark measures.

1. **latency**: from the moment the simulator's last packet of an image is sent to the moment that
   image's chunk is readable in the HDF5 file (target: p99 <= 20 ms at 100 Hz);
2. **constant memory**: the RSS of every pipeline process stays flat over a long run (target: flat over
   100,000 images).

The pipeline is the production one (``_ours.OurPipeline``: receiver, synchroniser/assembler, writer
agent and h5 writer, one process each under the project's supervisor, write requests through an
embedded broker), fed by the project's UDP simulator (``DetectorSimulator``) with a 1-module Jungfrau
(1 MiB images) over loopback.

Latency method. The simulator runs in its own process and records ``time.monotonic()`` right after
the ``sendmmsg`` carrying the last packet of each image returned (CLOCK_MONOTONIC is system-wide on
Linux, so stamps of different processes compare). A follower process opens the file being written with
SWMR (``h5py.File(path, "r", swmr=True)``, polling for it to appear under its final name), refreshes
``/entry/data/n_written`` every ``--poll-interval`` (1 ms) and records when each row became visible;
rows [0, n_written) are complete and flushed (``daq_backend/writer/layout.py``), and
``/entry/data/image_id`` maps rows to images. Latency = visible - last packet sent, over the images
written with status good. The row became visible somewhere between the follower's previous poll and the
one that saw it: that gap is the measurement error (reported per run as median and max; the latency is
overestimated by at most that). Before measuring, a warm-up of ``--warmup-images`` (default: one pass
through the image ring, sent at ``--rss-rate``) touches every ring slot.

RSS method. A fresh pipeline receives ``--rss-images`` (default 100,000) at ``--rss-rate`` (default
1000 Hz). 100,000 MiB images would not fit in /dev/shm, so they are written as consecutive write
requests of ``--segment-images`` (default 1000) into files that are deleted once closed (the sender
pauses between requests so every image sent is requested); the processes are the same throughout,
which is what matters for RSS. ``ProcessMonitor`` samples every process each ``--rss-interval`` (1 s);
each sample is placed on the images axis by the sender's stamps. Per process: RSS after the warm-up
(the first ``--rss-warmup-fraction`` = 5 % of the images, and at least two passes through the rings,
whose shared pages count in RSS once touched), at the end, the maximum, and the least-squares slope in
MiB per 10,000 images after the warm-up; verdict *flat* when the slope is below ``--flat-threshold``
(default 1 MiB per 10k images, i.e. less than 10 MiB per 100k images). The split of RSS into anonymous,
file and shared memory (``/proc/<pid>/status``) is recorded at every request boundary.

/dev/shm holds the rings (frame ring + image ring, ``--ring-slots`` each, default the config's 1000
= about 2 GiB) and one request's file at a time (``--segment-images`` MiB). Everything started is
stopped and every file removed, also on Ctrl-C or SIGTERM (then the results so far are written).
Output: ``benchmarks/out/bench_latency.{json,md,png}``.

    python benchmarks/bench_latency.py                                   # 3000 @ 100 Hz, 100k @ 1 kHz
    python benchmarks/bench_latency.py --latency-images 1000 --rss-images 20000
    python benchmarks/bench_latency.py --skip-rss --latency-rate 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import numpy as np  # noqa: E402
from _net import free_udp_base  # noqa: E402
from _ours import OurPipeline, PipelineError, read_h5_counts  # noqa: E402
from _procmon import ProcessMonitor  # noqa: E402
from _report import machine_facts  # noqa: E402
from _rmem import BenchmarkInterrupted, read_rmem_max, signals_raise  # noqa: E402

from daq_backend import ipc  # noqa: E402
from daq_backend.broker import EmbeddedBrokerHub  # noqa: E402
from daq_backend.config import DetectorConfig, parse_config  # noqa: E402
from daq_backend.ram_buffer import shm_path  # noqa: E402

log = logging.getLogger("bench_latency")

OUT_DIR = BENCH_DIR / "out"
SCHEMA = "std-daq-bench-latency/1"
MIB = 2**20
#: Processes of the pipeline (the verdict is about these); the others are reported for context.
HELPER_PROCS = ("simulator", "follower", "harness")


# -- the simulator process ---------------------------------------------------------------------------


def _sender_child(config_json: str, conn: Connection) -> None:
    """One ``DetectorSimulator`` for the whole phase; per command ``(start_id, n, rate)`` it sends the
    images (its own pacing) and answers with the monotonic time after each image's last packet."""
    try:
        from daq_backend.simulator.sender import DetectorSimulator

        stamps: list[float] = []

        class StampedSimulator(DetectorSimulator):
            def send_images(self, first_id: int, count: int) -> None:
                super().send_images(first_id, count)  # returns when sendmmsg took the last packet
                stamps.extend([time.monotonic()] * count)

        config = DetectorConfig.model_validate_json(config_json)
        # one image per sendmmsg: every image gets its own send time
        with StampedSimulator(config, rate_hz=0.0, n_images=0, max_batch=1) as sim:
            conn.send({"ready": True})
            while True:
                command = conn.recv()
                if command is None:
                    break
                start_id, n, rate = command
                stamps.clear()
                sim.start_id, sim.n_images, sim.rate_hz = int(start_id), int(n), float(rate)
                slips, cpu = sim.n_schedule_slips, time.process_time()
                sim.run()
                conn.send({"stamps": np.asarray(stamps, dtype=np.float64),
                           "slips": sim.n_schedule_slips - slips, "cpu_s": time.process_time() - cpu})
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    except BaseException:  # noqa: BLE001 - reported to the harness, which raises it
        with contextlib.suppress(OSError):
            conn.send({"error": traceback.format_exc()})


# -- the follower process ----------------------------------------------------------------------------


def _follower_child(conn: Connection) -> None:
    """Per command ``(path, n_rows, poll_interval)``: follow that file until ``n_rows`` are visible or
    any message arrives, then answer (see :func:`follow_file`)."""
    try:
        while True:
            command = conn.recv()
            if command is None:
                break
            path, n_rows, interval = command
            conn.send(follow_file(Path(path), int(n_rows), float(interval), conn))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    except BaseException:  # noqa: BLE001 - reported to the harness, which raises it
        with contextlib.suppress(OSError):
            conn.send({"error": traceback.format_exc()})


def follow_file(path: Path, n_rows: int, interval: float, conn: Connection) -> dict[str, Any]:
    """Poll ``n_written`` of the file at ``path`` (SWMR) every ``interval`` s; returns per row the time
    it was first seen (``t_visible``) and the time since the poll before (``error``: it became visible
    within that window), the rows' ids and status, and poll statistics. Returns after ``n_rows`` rows
    and the next message on ``conn`` (the harness's "the request is over"), or at that message."""
    import h5py

    from daq_backend.writer import layout

    t_start = time.monotonic()
    stop = False
    while not path.exists():  # the file gets its name only once it is complete and in SWMR mode
        if conn.poll(interval):
            conn.recv()
            return {"error": f"{path} did not appear within {time.monotonic() - t_start:.1f} s"}
    t_open = time.monotonic()
    visible: list[float] = []
    error: list[float] = []
    gaps: list[float] = []
    with h5py.File(path, "r", swmr=True) as h5:
        counter = h5[layout.N_WRITTEN]
        seen = 0
        t_prev = time.monotonic()
        while True:
            t_poll = time.monotonic()
            counter.refresh()
            n = int(counter[()])
            now = time.monotonic()
            if n > seen:
                visible += [now] * (n - seen)
                error += [now - t_prev] * (n - seen)
                seen = n
            gaps.append(t_poll - t_prev)
            t_prev = t_poll
            if stop or seen >= n_rows:
                break
            if conn.poll(interval):  # also the sleep between polls
                conn.recv()
                stop = True  # one last look, then report
        ids_ds, status_ds = h5[layout.IMAGE_ID], h5[layout.STATUS]
        ids_ds.refresh()
        status_ds.refresh()
        ids = np.asarray(ids_ds[:seen], dtype=np.int64)
        status = np.asarray(status_ds[:seen], dtype=np.uint8)
    if not stop:
        conn.recv()  # wait for "the request is over", so requests and answers stay paired
    gap = np.asarray(gaps[1:] or [0.0])
    return {"ids": ids, "status": status, "t_visible": np.asarray(visible), "error_window": np.asarray(error),
            "polls": len(gaps), "poll_gap_median_s": float(np.median(gap)),
            "poll_gap_max_s": float(gap.max()), "file_wait_s": t_open - t_start}


class Child:
    """A helper process (``spawn``: nothing inherited from the harness's threads) talking over a pipe."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child_conn), name=name, daemon=True)
        self.proc.start()
        child_conn.close()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def ready(self) -> bool:
        """An answer (or the end of the process) is waiting."""
        return self.conn.poll()

    def result(self, timeout: float) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer within {timeout:g} s")
        try:
            message = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} exited (code {self.proc.exitcode})") from None
        if "error" in message:
            raise RuntimeError(f"{self.name}: {message['error']}")
        return message

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


# -- statistics (pure) --------------------------------------------------------------------------------


def latency_figures(latencies_ms: Sequence[float]) -> dict[str, float | int]:
    """p50, p90, p99, max and mean (ms) of the latencies; NaN when there are none."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"n": int(values.size), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(values.max()), "mean": float(values.mean())}


def match_latencies(start_id: int, stamps: np.ndarray, ids: np.ndarray, status: np.ndarray,
                    t_visible: np.ndarray, error: np.ndarray) -> dict[str, Any]:
    """Latency (ms) of every good row of a requested image (first row of an id only), and its error."""
    ids = np.asarray(ids, dtype=np.int64)
    index = ids - start_id
    in_range = (index >= 0) & (index < len(stamps))
    first = np.zeros(ids.size, dtype=bool)
    _, where = np.unique(ids, return_index=True)
    first[where] = True
    use = in_range & first & (np.asarray(status) == 0)
    latency = (np.asarray(t_visible)[use] - np.asarray(stamps)[index[use]]) * 1000.0
    return {"latency_ms": latency, "error_ms": np.asarray(error)[use] * 1000.0, "ids": ids[use],
            "rows": int(ids.size), "good": int(use.sum()), "not_good": int((in_range & first & ~use).sum()),
            "foreign_rows": int((~in_range).sum()), "duplicate_rows": int((in_range & ~first).sum())}


def rss_fit(images: Sequence[float], values_bytes: Sequence[float], warmup_images: float) -> dict[str, Any]:
    """Of a memory series against images sent: the first value after the warm-up (``start``), the last
    (``end``), the maximum over the whole run (``max``) and the least-squares slope in MiB per 10,000
    images over the samples after the warm-up (NaN with fewer than 3 of them)."""
    x = np.asarray(images, dtype=np.float64)
    y = np.asarray(values_bytes, dtype=np.float64) / MIB
    out: dict[str, Any] = {"samples": 0, "start": math.nan, "end": math.nan,
                           "max": float(y.max()) if y.size else math.nan, "slope_per_10k": math.nan}
    keep = x >= warmup_images
    x, y = x[keep], y[keep]
    if x.size == 0:
        return out
    out.update(samples=int(x.size), start=float(y[0]), end=float(y[-1]))
    if x.size >= 3 and np.ptp(x) > 0:
        out["slope_per_10k"] = float(np.polyfit(x / 1e4, y, 1)[0])
    return out


def memory_verdict(private: dict[str, Any], shared_max_mib: float, rings_mib: float,
                   threshold_mib_per_10k: float) -> str:
    """``flat``: the private (not shared) RSS grows by less than the threshold per 10k images and the
    shared part stays within the rings' size; ``GROWING`` otherwise."""
    slope = private["slope_per_10k"]
    if math.isnan(slope):
        return "too few samples"
    if slope >= threshold_mib_per_10k:
        return "GROWING"
    if shared_max_mib > rings_mib + 16:
        return "GROWING (shared memory beyond the rings)"
    return "flat"


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and its split (RssAnon, RssFile, RssShmem) in bytes, from ``/proc/<pid>/status``."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class MemoryMonitor(ProcessMonitor):
    """A :class:`ProcessMonitor` (CPU, RSS) that also records with every sample how much of each
    process' RSS is shared memory (``RssShmem``: the rings' pages, counted in RSS once touched)."""

    def __init__(self, interval: float) -> None:
        self._pids: dict[str, int] = {}
        self._split_lock = threading.Lock()
        #: name -> (time, VmRSS bytes, RssShmem bytes)
        self.memory: dict[str, tuple[list[float], list[int], list[int]]] = {}
        super().__init__(interval)

    def add(self, name: str, pid: int) -> None:
        with self._split_lock:
            self._pids[name] = pid
            self.memory[name] = ([], [], [])
        super().add(name, pid)

    def sample(self) -> float:
        now = super().sample()
        with self._split_lock:
            for name, pid in self._pids.items():
                mem = proc_memory(pid)
                if "VmRSS" in mem:
                    t, rss, shared = self.memory[name]
                    t.append(now)
                    rss.append(mem["VmRSS"])
                    shared.append(mem.get("RssShmem", 0))
        return now

    def memory_series(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._split_lock:
            t, rss, shared = self.memory.get(name, ([], [], []))
            return np.asarray(t), np.asarray(rss, dtype=np.float64), np.asarray(shared, dtype=np.float64)


def rings_bytes(config: DetectorConfig) -> int:
    """Size of the detector's rings in /dev/shm (frame rings + image ring): the most shared memory any of
    its processes can map."""
    names = [ipc.frame_ring_name(config.detector_name, m) for m in config.required_modules]
    names.append(ipc.image_ring_name(config.detector_name))
    total = 0
    for name in names:
        with contextlib.suppress(OSError):
            total += shm_path(name).stat().st_size
    return total


# -- the benchmark ------------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit measured and the pipeline files changed since (the working tree is what runs)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "daq_backend"], cwd=BENCH_DIR,
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"git_commit": commit or None, "git_changed": changed}


def jungfrau_config(ring_slots: int | None) -> DetectorConfig:
    """A one-module Jungfrau (512x1024x16 bit = 1 MiB images) under a fresh name and UDP port."""
    data: dict[str, Any] = {
        "detector_name": f"benchlat{uuid.uuid4().hex[:8]}", "detector_type": "jungfrau", "n_modules": 1,
        "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
        "start_udp_port": free_udp_base(1),
    }
    if ring_slots is not None:
        data.update(frame_ring_slots=ring_slots, image_ring_slots=ring_slots)
    return parse_config(data)


class LatencyBenchmark:
    """Owns every process and file of the run; :meth:`run` returns the result document."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args = args
        self.command = command
        self.work = Path(tempfile.mkdtemp(prefix="std-daq-bench-latency-", dir=args.workdir))
        # unix socket paths must be short: not under the work dir
        self.ipc_dir = Path(tempfile.mkdtemp(prefix="sdqlat-", dir="/tmp"))
        self.hub: EmbeddedBrokerHub | None = None
        self.pipeline: OurPipeline | None = None
        self.children: list[Child] = []
        self.monitor: MemoryMonitor | None = None
        self.notes: list[str] = []
        self.interrupted: str | None = None
        self.latency: dict[str, Any] | None = None
        self.rss: dict[str, Any] | None = None

    # -- orchestration ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        args = self.args
        previous_ipc_dir = os.environ.get("STD_DAQ_IPC_DIR")
        os.environ["STD_DAQ_IPC_DIR"] = str(self.ipc_dir)
        facts = machine_facts(read_rmem_max())
        facts.update(git_state())
        try:
            self.hub = EmbeddedBrokerHub(f"benchlat-{uuid.uuid4().hex[:8]}")
            self.hub.start()
            if not args.skip_latency:
                self.latency = {"status": "running"}
                self._phase("latency", self._latency_phase)
            if not args.skip_rss:
                self.rss = {"status": "running"}
                self._phase("rss", self._rss_phase)
        except (KeyboardInterrupt, BenchmarkInterrupted) as exc:
            self.interrupted = str(exc) or type(exc).__name__
            log.error("interrupted (%s): writing the results so far", self.interrupted)
        finally:
            self._cleanup()
            if previous_ipc_dir is None:
                os.environ.pop("STD_DAQ_IPC_DIR", None)
            else:
                os.environ["STD_DAQ_IPC_DIR"] = previous_ipc_dir
        facts["loadavg_end"] = list(os.getloadavg())
        notes = list(self.notes)
        if self.interrupted:
            notes.append(f"INTERRUPTED ({self.interrupted}): results are partial")
        return {"schema": SCHEMA, "command": self.command, "machine": facts, "params": _params(args),
                "latency": self.latency, "rss": self.rss, "notes": notes}

    def _phase(self, name: str, body: Callable[[], None]) -> None:
        """One phase with its own pipeline; a failure is recorded, not fatal to the other phase."""
        try:
            body()
        except (KeyboardInterrupt, BenchmarkInterrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - one failed phase must not lose the other
            log.exception("%s phase failed", name)
            result = self.latency if name == "latency" else self.rss
            assert result is not None
            result["status"] = "failed"
            result["error"] = f"{type(exc).__name__}: {str(exc)[:3000]}"
        finally:
            self._stop_phase()

    def _start_phase(self, config: DetectorConfig, follower: bool) -> tuple[OurPipeline, Child, Child | None]:
        """Helpers first (their imports overlap the pipeline's start-up), then the pipeline."""
        sender = Child("simulator", _sender_child, config.model_dump_json())
        self.children.append(sender)
        follow = None
        if follower:
            follow = Child("follower", _follower_child)
            self.children.append(follow)
        assert self.hub is not None
        self.pipeline = OurPipeline(config, self.work / "pipeline", self.hub.broker_url,
                                    output_root=self.work)
        self.pipeline.start()
        sender.result(120)  # ready
        self.monitor = MemoryMonitor(interval=self.args.rss_interval).start()
        self.monitor.add("harness", os.getpid())
        for name, pid in self.pipeline.pids().items():
            self.monitor.add(name, pid)
        self.monitor.add(sender.name, sender.pid)
        if follow is not None:
            self.monitor.add(follow.name, follow.pid)
        return self.pipeline, sender, follow

    def _stop_phase(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        for child in self.children:
            child.close()
        self.children = []
        if self.pipeline is not None:
            self.pipeline.stop()
            self.pipeline = None
        for leftover in self.work.glob("*.h5"):
            leftover.unlink(missing_ok=True)

    def _cleanup(self) -> None:
        self._stop_phase()
        if self.hub is not None:
            self.hub.stop()
            self.hub = None
        if self.args.keep_logs:
            for log_file in self.work.rglob("*.log"):
                self.args.out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log_file, self.args.out / f"bench_latency-{log_file.name}")
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    # -- one write request ----------------------------------------------------------------------------
    def _segment(self, sender: Child, follower: Child | None, start_id: int, n: int, rate: float,
                 tag: str) -> dict[str, Any]:
        """Request ``n`` images into a fresh file, send them, wait until the file is closed, count it and
        delete it. With a follower: the file is followed while written."""
        pipeline = self.pipeline
        assert pipeline is not None
        path = self.work / f"{tag}-{start_id:08d}.h5"
        follow: dict[str, Any] | None = None
        try:
            request_id = pipeline.begin_write(n, path)
            if follower is not None:
                follower.send((str(path), n, self.args.poll_interval))
            sender.send((start_id, n, rate))
            written, killed = self._wait_written(request_id, n, sender, rate)
            sent = sender.result(60)
            if follower is not None:
                follower.send("over")
                follow = follower.result(60)
            counts = read_h5_counts(path, range(start_id, start_id + n))
        finally:
            path.unlink(missing_ok=True)
        stamps = sent["stamps"]
        if len(stamps) != n:
            raise RuntimeError(f"the simulator sent {len(stamps)} of {n} images")
        return {"start_id": start_id, "n": n, "rate": rate, "stamps": stamps, "slips": sent["slips"],
                "sender_cpu_s": sent["cpu_s"], "written": written, "killed": killed, "counts": counts,
                "follow": follow}

    def _wait_written(self, request_id: str, n: int, sender: Child, rate: float) -> tuple[int, bool]:
        """Until the h5 writer reports the request finished. When rows stop coming for ``--settle`` s
        after the sender is done (images were lost), kill the request so the file is closed. Gives up
        (PipelineError) when nothing at all happens for far longer than the run should take."""
        pipeline = self.pipeline
        assert pipeline is not None and pipeline.events is not None and pipeline.client is not None
        settle = self.args.settle
        limit = n / rate * 3 + 60 if rate > 0 else 120.0
        last_n, last_change, killed = -1, time.monotonic(), False
        while True:
            written, _, finished = pipeline.events.written(request_id)
            if finished is not None:
                return int(finished.get("n_written", written)), killed
            now = time.monotonic()
            if written != last_n:
                last_n, last_change = written, now
            elif not killed and sender.ready() and now - last_change > settle:
                log.warning("request %s: %d of %d rows, none for %.0f s: killing it", request_id, written, n,
                            settle)
                pipeline.client.kill(request_id)
                killed = True
            if now - last_change > limit:
                raise PipelineError(f"request {request_id}: no progress for {limit:.0f} s "
                                    f"({written} of {n} rows)\n{pipeline.log_tail()}")
            time.sleep(0.02)

    def _segments(self, total: int) -> list[int]:
        size = max(1, self.args.segment_images)
        return [min(size, total - k) for k in range(0, total, size)]

    # -- (1) latency ----------------------------------------------------------------------------------
    def _latency_phase(self) -> None:
        args = self.args
        config = jungfrau_config(args.ring_slots)
        result = self.latency
        assert result is not None
        result["detector"] = config.detector_name
        log.info("== latency: %d images at %g Hz (1-module Jungfrau, %d B images)", args.latency_images,
                 args.latency_rate, config.image_nbytes)
        _, sender, follower = self._start_phase(config, follower=True)
        assert follower is not None
        warmup = config.image_ring_slots if args.warmup_images is None else args.warmup_images
        next_id = 1
        if warmup > 0:
            log.info("warm-up: %d images at %g Hz", warmup, args.rss_rate)
            for n in self._segments(warmup):
                seg = self._segment(sender, None, next_id, n, args.rss_rate, "warmup")
                next_id += n
                if seg["counts"].good < n:
                    self.notes.append(f"latency warm-up: {n - seg['counts'].good} of {n} images not good")
        assert self.monitor is not None
        t0 = self.monitor.sample()
        segments: list[dict[str, Any]] = []
        result.update(status="running", detector=config.detector_name, warmup_images=warmup,
                      segments=segments)
        for n in self._segments(args.latency_images):
            seg = self._segment(sender, follower, next_id, n, args.latency_rate, "latency")
            next_id += n
            segments.append(_latency_segment(seg))
            result.update(_summarize_latency(segments, args.latency_target_ms))  # so far
            log.info("  ids %d..%d: %s", seg["start_id"], seg["start_id"] + n - 1,
                     _fmt_figures(latency_figures(segments[-1]["latency_ms"])))
        t1 = self.monitor.sample()
        result.update(_summarize_latency(segments, args.latency_target_ms))
        result["cpu_s"] = _cpu_table(self.monitor, t0, t1)
        result["status"] = "done"

    # -- (2) RSS over a long run ------------------------------------------------------------------------
    def _rss_phase(self) -> None:
        args = self.args
        config = jungfrau_config(args.ring_slots)
        result = self.rss
        assert result is not None
        warmup = max(math.ceil(args.rss_warmup_fraction * args.rss_images), min(args.segment_images,
                                                                                args.rss_images))
        if warmup >= args.rss_images:
            self.notes.append(f"rss: the warm-up ({warmup} images) is not shorter than the run "
                              f"({args.rss_images}): no slope, no verdict")
        log.info("== RSS: %d images at %g Hz in requests of %d (warm-up %d images)", args.rss_images,
                 args.rss_rate, args.segment_images, warmup)
        pipeline, sender, _ = self._start_phase(config, follower=False)
        monitor = self.monitor
        assert isinstance(monitor, MemoryMonitor)
        pids = dict(pipeline.pids())
        t0 = monitor.sample()
        stamps: list[np.ndarray] = []
        totals = {"sent": 0, "good": 0, "rows": 0, "incomplete": 0, "missing_ids": 0, "killed_requests": 0,
                  "sender_slips": 0, "send_seconds": 0.0}
        result.update(status="running", detector=config.detector_name, warmup_images=warmup, requests=0,
                      totals=totals, rings_mib=rings_bytes(config) / MIB, pids=pids)
        next_id, last_report = 1, time.monotonic()
        for n in self._segments(args.rss_images):
            seg = self._segment(sender, None, next_id, n, args.rss_rate, "rss")
            next_id += n
            stamps.append(seg["stamps"])
            counts = seg["counts"]
            totals["sent"] += n
            totals["good"] += counts.good
            totals["rows"] += counts.rows
            totals["incomplete"] += counts.incomplete
            totals["missing_ids"] += counts.missing_ids
            totals["killed_requests"] += int(seg["killed"])
            totals["sender_slips"] += seg["slips"]
            totals["send_seconds"] += float(seg["stamps"][-1] - seg["stamps"][0]) if n > 1 else 0.0
            result["requests"] += 1
            self._rss_result(result, monitor, np.concatenate(stamps), t0, warmup)
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                now_mib = ", ".join(f"{k} {v['series_rss_mib'][-1]:.0f}"
                                    for k, v in result["processes"].items() if v["series_rss_mib"])
                log.info("  %d / %d images sent, %d good; RSS MiB %s", totals["sent"], args.rss_images,
                         totals["good"], now_mib)
        monitor.sample()
        self._rss_result(result, monitor, np.concatenate(stamps), t0, warmup)
        restarts = pipeline.restarts()
        if restarts:
            result["restarts"] = restarts
            self.notes.append(f"rss: services restarted during the run ({restarts}): their series end at the "
                              "restart")
        result["status"] = "done"

    def _rss_result(self, result: dict[str, Any], monitor: MemoryMonitor, stamps: np.ndarray, t0: float,
                    warmup: int) -> None:
        """Series and verdict of every process so far (called after each request: an interrupted run
        still has its numbers)."""
        totals = result["totals"]
        intervals = stamps.size - result["requests"]  # between images of the same request
        result["achieved_rate_hz"] = intervals / totals["send_seconds"] if totals["send_seconds"] > 0 else 0.0
        t_end = float(stamps[-1]) if stamps.size else t0
        processes: dict[str, Any] = {}
        for name in monitor.names():
            t, rss, shared = monitor.memory_series(name)
            keep = t >= t0
            t, rss, shared = t[keep], rss[keep], shared[keep]
            images = np.searchsorted(stamps, t, side="right").astype(np.float64)
            private = rss_fit(images, rss - shared, warmup)
            shared_max = float(shared.max() / MIB) if shared.size else math.nan
            pipeline = name not in HELPER_PROCS
            processes[name] = {
                "pipeline": pipeline, "pid": result["pids"].get(name),
                "rss": rss_fit(images, rss, warmup), "private": private, "shared_max": shared_max,
                "verdict": memory_verdict(private, shared_max, result["rings_mib"], self.args.flat_threshold),
                "series_t": [round(v - t0, 3) for v in t], "series_images": images.astype(int).tolist(),
                "series_rss_mib": [round(v / MIB, 3) for v in rss],
                "series_private_mib": [round(v / MIB, 3) for v in rss - shared],
            }
        result["processes"] = processes
        verdicts = [p["verdict"] for p in processes.values() if p["pipeline"]]
        result["all_flat"] = bool(verdicts) and all(v == "flat" for v in verdicts)
        result["wall_s"] = time.monotonic() - t0
        result["cpu_s"] = _cpu_table(monitor, t0, t_end)


def _latency_segment(seg: dict[str, Any]) -> dict[str, Any]:
    follow = seg["follow"]
    matched = match_latencies(seg["start_id"], seg["stamps"], follow["ids"], follow["status"],
                              follow["t_visible"], follow["error_window"])
    stamps = seg["stamps"]
    seconds = float(stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    counts = seg["counts"]
    return {"start_id": seg["start_id"], "n": seg["n"], "send_seconds": seconds,
            "achieved_rate_hz": (len(stamps) - 1) / seconds if seconds > 0 else 0.0, "slips": seg["slips"],
            "killed": seg["killed"], "good": counts.good, "incomplete": counts.incomplete,
            "missing_ids": counts.missing_ids, "duplicate_ids": counts.duplicate_ids,
            "followed_rows": matched["rows"], "latency_ms": matched["latency_ms"].tolist(),
            "error_ms": matched["error_ms"].tolist(), "polls": follow["polls"],
            "poll_gap_median_ms": follow["poll_gap_median_s"] * 1000,
            "poll_gap_max_ms": follow["poll_gap_max_s"] * 1000, "file_wait_ms": follow["file_wait_s"] * 1000}


def _summarize_latency(segments: list[dict[str, Any]], target_ms: float) -> dict[str, Any]:
    latency = [v for s in segments for v in s["latency_ms"]]
    error = np.asarray([v for s in segments for v in s["error_ms"]] or [math.nan])  # NaN: nothing seen
    sent = sum(s["n"] for s in segments)
    good = sum(s["good"] for s in segments)
    seconds = sum(s["send_seconds"] for s in segments)
    figures = latency_figures(latency)
    return {
        "images": sent, "good": good, "lost": sent - good,
        "incomplete": sum(s["incomplete"] for s in segments),
        "missing_ids": sum(s["missing_ids"] for s in segments),
        "killed_requests": sum(int(s["killed"]) for s in segments),
        "sender_slips": sum(s["slips"] for s in segments),
        "achieved_rate_hz": sum(s["n"] - 1 for s in segments) / seconds if seconds > 0 else 0.0,
        "latency_ms": figures,
        "error_ms": {"median": float(np.median(error)), "p99": float(np.percentile(error, 99)),
                     "max": float(error.max())},
        "poll_gap_median_ms": float(np.median([s["poll_gap_median_ms"] for s in segments])) if segments
        else math.nan,
        "target_ms": target_ms,
        "target_met": bool(figures["n"]) and figures["p99"] <= target_ms,
    }


def _cpu_table(monitor: ProcessMonitor, t0: float, t1: float) -> dict[str, float]:
    out: dict[str, float] = {}
    watched = 0.0
    for name in monitor.names():
        usage = monitor.usage(name, t0, t1)
        if usage is not None:
            out[name] = round(usage.cpu_s, 3)
            watched += usage.cpu_s
    out["other programs"] = round(max(0.0, monitor.machine_cpu(t0, t1) - watched), 3)
    return out


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


# -- output ------------------------------------------------------------------------------------------


def _fmt_figures(f: dict[str, Any]) -> str:
    if not f["n"]:
        return "no latencies"
    return f"p50 {f['p50']:.2f} ms, p90 {f['p90']:.2f}, p99 {f['p99']:.2f}, max {f['max']:.2f} (n={f['n']})"


def _num(value: Any, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def render_markdown(doc: dict[str, Any]) -> str:
    facts = doc["machine"]
    params = doc["params"]
    lines = [f"# Latency and memory benchmark {facts['date']}", "", f"Command: `{doc['command']}`", "",
             "## Machine", "", "| fact | value |", "|---|---|"]
    for key in ("date", "host", "cpu_model", "nproc", "memory_gb", "kernel", "python", "numpy", "h5py",
                "hdf5", "pyzmq", "git_commit", "git_changed", "loadavg_start", "loadavg_end"):
        if key in facts:
            lines.append(f"| {key} | {facts[key]} |")
    lines += ["", "The machine may be shared: *other programs* below is the CPU everything not watched used "
              "meanwhile."]

    lat = doc.get("latency")
    lines += ["", "## Latency: last packet sent -> chunk readable in the HDF5 file", ""]
    if lat is None:
        lines.append("skipped")
    elif "latency_ms" not in lat:
        lines.append(f"**{lat.get('status')}**: {lat.get('error', 'no result')}")
    else:
        lines += _partial(lat)
        f = lat["latency_ms"]
        verdict = "**met**" if lat["target_met"] else "**NOT met**"
        lines += [
            f"1-module Jungfrau (1 MiB images), {lat['images']} images requested at "
            f"{params['latency_rate']:g} Hz in requests of {params['segment_images']} "
            f"(after a warm-up of {lat['warmup_images']} images). Latency over the {f['n']} images written "
            f"with status good; the follower polled `n_written` every {params['poll_interval'] * 1000:g} ms "
            f"(median gap between polls {_num(lat['poll_gap_median_ms'], 2)} ms).", "",
            "| images | achieved rate Hz | good | lost / not good | p50 ms | p90 ms | p99 ms | max ms | "
            "measurement error ms (median / max) | target p99 <= "
            f"{lat['target_ms']:g} ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {lat['images']} | {_num(lat['achieved_rate_hz'])} | {lat['good']} | {lat['lost']} | "
            f"{_num(f['p50'], 2)} | {_num(f['p90'], 2)} | {_num(f['p99'], 2)} | {_num(f['max'], 2)} | "
            f"{_num(lat['error_ms']['median'], 2)} / {_num(lat['error_ms']['max'], 2)} | {verdict} |",
            "", "Measurement error: a row became visible between the follower's previous poll and the one "
            "that saw it, so each latency is overestimated by at most that gap (shown).",
        ]
        if lat.get("sender_slips") or lat.get("killed_requests"):
            lines.append(f"Simulator schedule slips: {lat['sender_slips']}; requests killed because images "
                         f"were missing: {lat['killed_requests']}.")
        lines += _cpu_lines(lat.get("cpu_s"), lat["images"])

    rss = doc.get("rss")
    lines += ["", "## Memory: RSS of every process over a long run", ""]
    if rss is None:
        lines.append("skipped")
    elif "processes" not in rss:
        lines.append(f"**{rss.get('status')}**: {rss.get('error', 'no result')}")
    else:
        lines += _partial(rss)
        totals = rss["totals"]
        lines += [
            f"{totals['sent']} images (1 MiB) sent at {params['rss_rate']:g} Hz requested, "
            f"{_num(rss['achieved_rate_hz'])} Hz achieved while sending, written as {rss['requests']} "
            f"requests of {params['segment_images']} images (each file deleted when closed; "
            f"{_num(rss['wall_s'], 0)} s in all); {totals['good']} good, {totals['sent'] - totals['good']} "
            f"lost or not good. Memory sampled every {params['rss_interval']:g} s. *start* = first sample "
            f"after the warm-up of {rss['warmup_images']} images, *end* = last sample, *max* = over the "
            "whole run, *slope* = least squares over the samples after the warm-up, in MiB per 10,000 "
            "images.", "",
            f"RSS = private + shared. *Shared* is the rings' pages ({_num(rss['rings_mib'], 0)} MiB of rings "
            "in /dev/shm), counted in a process' RSS once its mapping holds them: every process maps all "
            "pages of its rings when it creates or attaches them, so this part is constant and bounded by "
            "the rings' size. A leak shows in the *private* part: verdict *flat* = private slope < "
            f"{params['flat_threshold']:g} MiB per 10k images and shared memory within the rings' size.", "",
            "| process | RSS start MiB | RSS end MiB | RSS max MiB | RSS slope | shared max MiB | "
            "private start MiB | private end MiB | private max MiB | private slope | samples | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, p in rss["processes"].items():
            label = name if p["pipeline"] else f"{name} (not pipeline)"
            verdict = p["verdict"] if p["pipeline"] else f"({p['verdict']})"
            r, q = p["rss"], p["private"]
            lines.append(f"| {label} | {_num(r['start'])} | {_num(r['end'])} | {_num(r['max'])} | "
                         f"{_num(r['slope_per_10k'], 2)} | {_num(p['shared_max'])} | {_num(q['start'])} | "
                         f"{_num(q['end'])} | {_num(q['max'])} | {_num(q['slope_per_10k'], 3)} | "
                         f"{q['samples']} | {verdict} |")
        lines += ["", f"All pipeline processes flat: **{'yes' if rss['all_flat'] else 'no'}**."]
        lines += _cpu_lines(rss.get("cpu_s"), totals["sent"])
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in doc["notes"]]
    return "\n".join(lines) + "\n"


def headline(doc: dict[str, Any]) -> list[list[str]]:
    """The README rows of a run: latency percentiles at its rate, RSS verdict."""
    rows: list[list[str]] = []
    lat, rss, params = doc.get("latency"), doc.get("rss"), doc["params"]
    if isinstance(lat, dict) and "latency_ms" in lat:
        f = lat["latency_ms"]
        rows.append([f"latency, last packet -> readable in the HDF5 file, {params['latency_rate']:g} Hz, "
                     f"{lat['images']} images", f"p50 {_num(f['p50'], 2)} ms, p99 {_num(f['p99'], 2)} ms, "
                     f"max {_num(f['max'], 2)} ms; {lat['lost']} lost",
                     f"target p99 <= {lat['target_ms']:g} ms: {'met' if lat['target_met'] else 'NOT met'}"])
    if isinstance(rss, dict) and "processes" in rss:
        slopes = [p["private"]["slope_per_10k"] for p in rss["processes"].values() if p["pipeline"]]
        worst = max(slopes) if slopes else float("nan")
        rows.append([f"RSS of every pipeline process over {rss['totals']['sent']} images at "
                     f"{_num(rss['achieved_rate_hz'])} Hz",
                     f"{'flat' if rss['all_flat'] else 'NOT flat'} (largest private slope "
                     f"{_num(worst, 2)} MiB per 10k images); "
                     f"{rss['totals']['sent'] - rss['totals']['good']} lost or not good",
                     f"flat = private slope < {params['flat_threshold']:g} MiB per 10k images"])
    return rows


def _partial(result: dict[str, Any]) -> list[str]:
    if result.get("status") == "done":
        return []
    why = result.get("error") or "interrupted"
    return [f"**{result.get('status')}** ({why}): the figures cover the requests completed before.", ""]


def _cpu_lines(cpu: dict[str, float] | None, images: int) -> list[str]:
    if not cpu:
        return []
    return ["", "CPU seconds during the measured images: " + ", ".join(
        f"{name} {seconds:.1f}" for name, seconds in cpu.items()) + f" ({images} images)."]


def render_plot(doc: dict[str, Any], path: Path) -> Path:
    """Latency histogram and CDF (top), RSS versus images and its change since the warm-up (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    (ax_hist, ax_cdf), (ax_rss, ax_delta) = axes
    lat = doc.get("latency") or {}
    values = np.asarray([v for s in lat.get("segments", []) for v in s["latency_ms"]])
    if values.size:
        f = lat["latency_ms"]
        bins = np.linspace(0, max(float(values.max()), lat["target_ms"]) * 1.02, 80)
        ax_hist.hist(values, bins=bins, color="tab:orange")
        ax_hist.set_yscale("log")
        order = np.sort(values)
        ax_cdf.plot(order, np.arange(1, order.size + 1) / order.size, color="tab:orange")
        for ax in (ax_hist, ax_cdf):
            for value, style, label in ((f["p50"], ":", "p50"), (f["p99"], "--", "p99"),
                                        (lat["target_ms"], "-", "target")):
                ax.axvline(value, color="black" if label != "target" else "tab:red", linestyle=style,
                           label=f"{label} {value:.2f} ms")
            ax.set_xlabel("last packet sent -> visible in the HDF5 file (ms)")
            ax.legend()
        ax_hist.set_ylabel("images")
        ax_cdf.set_ylabel("fraction of images")
        ax_hist.set_title(f"latency, {f['n']} images at {doc['params']['latency_rate']:g} Hz")
        ax_cdf.set_title("latency CDF")
    else:
        for ax in (ax_hist, ax_cdf):
            ax.text(0.5, 0.5, "latency: no result", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    rss = doc.get("rss") or {}
    processes = rss.get("processes", {})
    if processes:
        warmup = rss["warmup_images"]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, (name, p) in enumerate(processes.items()):
            color = colors[k % len(colors)]
            x = np.asarray(p["series_images"])
            total = np.asarray(p["series_rss_mib"])
            private = np.asarray(p["series_private_mib"])
            ax_rss.plot(x, total, "-", color=color, label=f"{name} RSS")
            ax_rss.plot(x, private, ":", color=color, label=f"{name} private")
            after = x >= warmup
            if after.any() and p["pipeline"]:
                slope = p["private"]["slope_per_10k"]
                ax_delta.plot(x[after], private[after] - private[after][0], "-", color=color,
                              label=f"{name}: {_num(slope, 2)} MiB/10k ({p['verdict']})")
        for ax in (ax_rss, ax_delta):
            ax.axvspan(0, warmup, color="0.9")
            ax.set_xlabel("images sent (grey: warm-up)")
            ax.legend(fontsize="small", ncol=2 if ax is ax_rss else 1)
        ax_rss.set_ylabel("MiB")
        ax_rss.set_yscale("log")
        ax_rss.set_title("RSS (solid) and its private part (dotted) per process")
        ax_delta.set_ylabel("private RSS - private RSS after the warm-up (MiB)")
        ax_delta.set_title(f"pipeline processes, private RSS change (flat: < "
                           f"{doc['params']['flat_threshold']:g} MiB/10k images)")
    else:
        for ax in (ax_rss, ax_delta):
            ax.text(0.5, 0.5, "RSS: no result", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    fig.suptitle(f"std-daq latency and memory, {doc['machine'].get('cpu_model', '')}, "
                 f"{doc['machine'].get('nproc')} cores, {doc['machine'].get('date', '')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path, Path, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / "bench_latency"
    json_path, md_path, png_path = (base.with_suffix(s) for s in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(_no_nan(doc), indent=1, default=_json_default))
    markdown = render_markdown(doc)
    md_path.write_text(markdown)
    render_plot(doc, png_path)
    return json_path, md_path, png_path, markdown


def _no_nan(value: Any) -> Any:
    """NaN (no value) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- command line --------------------------------------------------------------------------------------


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_latency.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency-images", type=_positive(int), default=3000,
                   help="images measured (default 3000)")
    p.add_argument("--latency-rate", type=_positive(float), default=100.0,
                   help="their rate in Hz (default 100)")
    p.add_argument("--latency-target-ms", type=_positive(float), default=20.0, help="p99 target (default 20)")
    p.add_argument("--poll-interval", type=_positive(float), default=0.001,
                   help="seconds between the follower's polls of n_written (default 0.001)")
    p.add_argument("--warmup-images", type=int, default=None,
                   help="images sent (at --rss-rate) before the latency is measured (default: the image "
                        "ring's slots)")
    p.add_argument("--rss-images", type=_positive(int), default=100_000, help="images of the RSS run "
                   "(default 100000)")
    p.add_argument("--rss-rate", type=_positive(float), default=1000.0, help="its rate in Hz (default 1000)")
    p.add_argument("--rss-interval", type=_positive(float), default=1.0, help="seconds between RSS samples "
                   "(default 1)")
    p.add_argument("--rss-warmup-fraction", type=float, default=0.05,
                   help="images left out of the RSS fit at the start, as a fraction (default 0.05; at least "
                        "two passes through the rings)")
    p.add_argument("--flat-threshold", type=_positive(float), default=1.0,
                   help="slope (MiB per 10k images) below which RSS counts as flat (default 1)")
    p.add_argument("--segment-images", type=_positive(int), default=1000,
                   help="images per write request / file; one file exists at a time (default 1000 = 1 GiB)")
    p.add_argument("--ring-slots", type=_positive(int), default=None,
                   help="slots of the frame and image rings (default: the config default, 1000)")
    p.add_argument("--settle", type=_positive(float), default=3.0,
                   help="seconds without new rows after the sender ended before a request is killed")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm"), help="where the HDF5 files go")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default benchmarks/out)")
    p.add_argument("--keep-logs", action="store_true", help="copy the pipeline's log into --out")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    p.add_argument("--record", action="store_true",
                   help="also write benchmarks/records/bench_latency.json and regenerate RESULTS.md and "
                        "the README table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.skip_latency and args.skip_rss:
        raise SystemExit("bench_latency.py: nothing to do (--skip-latency and --skip-rss)")
    if args.warmup_images is not None and args.warmup_images < 0:
        raise SystemExit("bench_latency.py: --warmup-images must be >= 0")
    if not 0 <= args.rss_warmup_fraction < 1:
        raise SystemExit("bench_latency.py: --rss-warmup-fraction must be in [0, 1)")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = "python benchmarks/bench_latency.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    from _records import Record, compact, machine_info, write_record

    started = machine_info()
    with signals_raise():
        bench = LatencyBenchmark(args, command.strip())
        doc = bench.run()
        json_path, md_path, png_path, markdown = write_outputs(doc, args.out)
    print(markdown)
    print(f"results: {md_path}\n         {json_path}\n         {png_path}")
    if args.record:
        record = Record("bench_latency", command.strip(), figures={"headline": headline(doc)},
                        notes=list(args.note), raw=compact(_no_nan(doc)))
        print(f"recorded in {write_record(record, started)}")
        import report

        report.main([])
    failed = any(isinstance(r, dict) and r.get("status") == "failed" for r in (doc["latency"], doc["rss"]))
    return 130 if bench.interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
