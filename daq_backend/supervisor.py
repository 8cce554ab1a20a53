"""Supervisor of one detector's processes (``std-daq up CONFIG``).

Starts one OS process per service (receivers, assembler, and whatever else is handed in as a
``ServiceSpec``), restarts a crashed one with exponential backoff, collects every process' stats
and writes them to the detector's status file (``ipc.status_file``) for ``std-daq status``. On
SIGTERM/Ctrl-C (or ``stop()``) it terminates the children by PID, waits for them, and removes the
shared-memory segments and ipc socket files of *its* detector that a killed owner left behind.

Children run in their own session (a terminal's Ctrl-C reaches only the supervisor, which then stops
them in order) and get ``PR_SET_PDEATHSIG`` so they die with a SIGKILLed supervisor too.

A child that *cannot* start (its port is taken, its host has no such address, /dev/shm has no room
for its ring, its config no longer loads) exits with ``EXIT_CANNOT_START`` after writing why to the
file named by ``STD_DAQ_FAILURE_FILE`` (``component.build_component``): restarting it would fail the same way,
so the supervisor logs the reason once, marks the service ``failed`` in the status (``std-daq status``
shows it) and leaves it down; the other services keep running.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daq_backend import ipc
from daq_backend.component import (  # noqa: F401 (run_service: re-exported)
    EXIT_CANNOT_START,
    FAILURE_FILE_ENV,
    SERVICE_NAME_ENV,
    run_service,
)
from daq_backend.config import DetectorConfig
from daq_backend.ram_buffer import shm_path
from daq_backend.stats import StatsCollector

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when the supervisor dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _run_target(target: Callable[..., object], args: tuple[Any, ...], name: str) -> None:
    _die_with_parent()
    os.environ[SERVICE_NAME_ENV] = name
    target(*args)


@dataclass(frozen=True)
class ServiceSpec:
    """One supervised process: a command line (``argv``) or a picklable ``target`` run in a spawned
    interpreter. ``shm_names`` / ``ipc_addresses``: what this service owns and may leave behind if
    killed; the supervisor removes them after stopping everything."""

    name: str
    argv: tuple[str, ...] | None = None
    target: Callable[..., object] | None = None
    args: tuple[Any, ...] = ()
    restart: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    shm_names: tuple[str, ...] = ()
    ipc_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.target is None):
            raise ValueError(f"service {self.name!r}: give exactly one of argv and target")


def readout_services(config: DetectorConfig, config_path: str | Path) -> list[ServiceSpec]:
    """A receiver per required module plus the synchroniser/assembler."""
    det = config.detector_name
    path = str(config_path)
    specs = [
        ServiceSpec(
            f"receiver-{m}",
            argv=(sys.executable, "-m", "daq_backend.readout.receiver", path, str(m)),
            shm_names=(ipc.frame_ring_name(det, m),),
        )
        for m in config.required_modules
    ]
    specs.append(
        ServiceSpec(
            "assembler",
            argv=(sys.executable, "-m", "daq_backend.readout.assembler", path),
            shm_names=(ipc.image_ring_name(det),),
            ipc_addresses=(ipc.module_frames_address(det), ipc.image_metadata_address(det)),
        )
    )
    return specs


class _Child:
    """A service's current process and its history."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | multiprocessing.process.BaseProcess | None = None
        self.started = 0.0
        self.restarts = 0
        self.exit_code: int | None = None
        self.next_start: float | None = None
        self.backoff = 0.0
        #: why the service cannot start (it exited with ``EXIT_CANNOT_START``); None while it may run
        self.failed: str | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def poll(self) -> int | None:
        """Exit code if the process ended, else None."""
        if self.proc is None:
            return self.exit_code
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll()
        return self.proc.exitcode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.poll() is None


class Supervisor:
    """Starts, watches, restarts and stops the processes of one detector (see module doc)."""

    def __init__(
        self,
        config: DetectorConfig,
        config_path: str | Path | None = None,
        extra_services: Iterable[ServiceSpec] = (),
        *,
        readout: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        stable_after: float = 30.0,
        stop_timeout: float = 10.0,
        status_interval: float = 1.0,
        preflight: bool = True,
    ) -> None:
        self.config = config
        self.detector = config.detector_name
        self._own_config_file = config_path is None
        self.config_path = Path(config_path) if config_path else Path(ipc.config_file(self.detector))
        services = (readout_services(config, self.config_path) if readout else []) + list(extra_services)
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise ValueError(f"service names must be unique, got {names}")
        self.services = services
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.status_interval = status_interval
        #: check the host (UDP ports, /dev/shm) before starting the readout (``preflight``)
        self.preflight = preflight and readout
        self.status_path = Path(ipc.status_file(self.detector))
        self._children = {s.name: _Child(s) for s in services}
        self._stop = threading.Event()
        self._started = False
        self._collector: StatsCollector | None = None
        self._next_status = 0.0
        self._lock = threading.Lock()

    # -- public ------------------------------------------------------------------------------
    def check_can_start(self) -> None:
        """Refuse to start a detector that is up already (RuntimeError) or that this host cannot run
        (``preflight``: a ConfigError naming the field and the fix)."""
        if self.status_path.exists():
            try:
                other = read_status(self.status_path)
            except (OSError, ValueError):
                other = {"stale": True}
            if not other["stale"]:
                raise RuntimeError(
                    f"{self.detector} is already up (supervisor pid {other.get('supervisor_pid')}); "
                    f"a second instance would take over its ports, rings and sockets"
                )
        if self.preflight:
            from daq_backend.preflight import check_before_start

            check_before_start(self.config)

    def start(self) -> None:
        """Spawn every service (returns at once; ``run()`` / ``poll_once()`` watch them)."""
        if self._started:
            return
        self.check_can_start()
        self._started = True
        if self._own_config_file:
            self.config_path.write_text(json.dumps(self.config.to_json_dict(), indent=1))
        try:
            self._collector = StatsCollector(self.detector)
            for child in self._children.values():
                self._spawn(child)
        except BaseException:
            self.shutdown()
            raise
        log.info("%s: started %d services", self.detector, len(self._children))
        self._write_status()

    def run(self) -> None:
        """Supervise until ``stop()`` or SIGTERM/SIGINT (handlers only when in the main thread)."""
        self.start()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda signum, _f: self._on_signal(signum))
        try:
            while not self._stop.is_set():
                self.poll_once()
                self._stop.wait(0.1)
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self) -> None:
        """One supervision step: restart what died, read stats, refresh the status file."""
        now = time.monotonic()
        with self._lock:
            for child in self._children.values():
                if child.proc is not None:
                    code = child.poll()
                    if code is not None and not self._stop.is_set():
                        self._on_exit(child, code, now)
                elif child.next_start is not None and now >= child.next_start and not self._stop.is_set():
                    child.restarts += 1
                    log.warning("%s: restarting %s (restart #%d)",
                                self.detector, child.spec.name, child.restarts)
                    try:
                        self._spawn(child)
                    except OSError as exc:  # e.g. the executable vanished: keep trying, keep the rest
                        log.error("%s: cannot start %s: %s", self.detector, child.spec.name, exc)
                        child.backoff = min(max(child.backoff, self.backoff_initial) * 2, self.backoff_max)
                        child.next_start = now + child.backoff
        if self._collector is not None:
            self._collector.drain()
        if now >= self._next_status:
            self._write_status()

    def status(self) -> dict[str, Any]:
        """Liveness and latest counters of every service (what the status file holds)."""
        now = time.monotonic()
        latest = self._collector.latest if self._collector is not None else {}
        services = []
        for name, child in self._children.items():
            stats = latest.get(name, {})
            services.append(
                {
                    "name": name,
                    "pid": child.pid,
                    "alive": child.alive,
                    "restarts": child.restarts,
                    "exit_code": child.exit_code,
                    "failed": child.failed,
                    "uptime": round(now - child.started, 3) if child.alive else 0.0,
                    "counters": stats.get("counters", {}),
                    "rates": stats.get("rates", {}),
                    "stats_time": stats.get("time"),
                }
            )
        return {
            "detector": self.detector,
            "supervisor_pid": os.getpid(),
            "config": str(self.config_path),
            "updated": time.time(),
            "interval": self.status_interval,
            "services": services,
        }

    def pids(self) -> dict[str, int | None]:
        return {name: child.pid for name, child in self._children.items()}

    def shutdown(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after ``stop_timeout``) and clean up leftovers."""
        self._stop.set()
        if not self._started:
            return
        with self._lock:
            children = [c for c in self._children.values() if c.proc is not None]
            for child in children:
                if child.alive:
                    self._signal(child, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            for child in children:
                if not self._wait(child, max(0.0, deadline - time.monotonic())):
                    log.warning("%s: %s did not stop in time, killing it", self.detector, child.spec.name)
                    self._signal(child, signal.SIGKILL)
                    self._wait(child, 5.0)
                child.exit_code = child.poll()
                child.proc = None
        self._remove_leftovers()
        if self._collector is not None:
            self._collector.close()
            self._collector = None
        self.status_path.unlink(missing_ok=True)
        if self._own_config_file:
            self.config_path.unlink(missing_ok=True)

    # -- internals ---------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        log.info("%s: signal %d, stopping all services", self.detector, signum)
        self._stop.set()

    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        env = dict(os.environ, **spec.env)
        env[SERVICE_NAME_ENV] = spec.name
        env["STD_DAQ_IPC_DIR"] = ipc.ipc_dir()
        failure = self._failure_file(spec.name)
        failure.unlink(missing_ok=True)
        env[FAILURE_FILE_ENV] = str(failure)
        if spec.argv is not None:
            child.proc = subprocess.Popen(
                list(spec.argv), env=env, start_new_session=True, preexec_fn=_die_with_parent
            )
        else:
            ctx = multiprocessing.get_context("spawn")
            proc = ctx.Process(target=_run_target, args=(spec.target, spec.args, spec.name), name=spec.name)
            proc.start()
            child.proc = proc
        child.started = time.monotonic()
        child.next_start = None
        child.exit_code = None
        child.failed = None
        log.info("%s: %s started, pid %d", self.detector, spec.name, child.proc.pid)

    def _on_exit(self, child: _Child, code: int, now: float) -> None:
        spec = child.spec
        child.exit_code = code
        ran = now - child.started
        self._reap(child)
        child.proc = None
        if code == EXIT_CANNOT_START:
            failure = self._failure_file(spec.name)
            try:
                reason = failure.read_text().strip() or f"exit code {code}"
            except OSError:
                reason = f"exit code {code} (no reason left in {failure})"
            failure.unlink(missing_ok=True)
            child.failed = reason
            log.error("%s: %s cannot start: %s (not restarted: fix the cause and start the detector again)",
                      self.detector, spec.name, reason)
            return
        if not spec.restart:
            log.error("%s: %s exited with %s (not restarted)", self.detector, spec.name, code)
            return
        if ran >= self.stable_after or child.backoff == 0.0:
            child.backoff = self.backoff_initial
        else:
            child.backoff = min(child.backoff * 2, self.backoff_max)
        child.next_start = now + child.backoff
        log.error("%s: %s exited with %s after %.1f s; restart in %.1f s",
                  self.detector, spec.name, code, ran, child.backoff)

    @staticmethod
    def _reap(child: _Child) -> None:
        if isinstance(child.proc, subprocess.Popen):
            child.proc.wait()
        elif child.proc is not None:
            child.proc.join()

    @staticmethod
    def _signal(child: _Child, sig: int) -> None:
        assert child.proc is not None
        try:
            os.kill(child.proc.pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _wait(child: _Child, timeout: float) -> bool:
        proc = child.proc
        if isinstance(proc, subprocess.Popen):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        assert proc is not None
        proc.join(timeout)
        return proc.exitcode is not None

    def _failure_file(self, service: str) -> Path:
        return Path(ipc.ipc_dir()) / f"std-daq-{self.detector}-{service}-failure.txt"

    def _remove_leftovers(self) -> None:
        """Unlink this detector's rings and ipc socket files that a killed owner left behind."""
        det = self.detector
        names = {ipc.frame_ring_name(det, m) for m in range(self.config.n_modules)}
        names.add(ipc.image_ring_name(det))
        addresses: set[str] = set()
        for spec in self.services:
            names.update(spec.shm_names)
            addresses.update(spec.ipc_addresses)
        for name in sorted(names):
            path = shm_path(name)
            if path.exists():
                log.warning("%s: removing leftover shared memory %s", det, path)
                path.unlink(missing_ok=True)
        for address in sorted(addresses):
            ipc.unlink_ipc(address)
        for spec in self.services:
            self._failure_file(spec.name).unlink(missing_ok=True)

    def _write_status(self) -> None:
        self._next_status = time.monotonic() + self.status_interval
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1))
        os.replace(tmp, self.status_path)


def read_status(path: str | Path) -> dict[str, Any]:
    """A status file as written by a running supervisor, with ``stale`` set when its supervisor is
    gone or has not refreshed it for three intervals."""
    data = json.loads(Path(path).read_text())
    age = time.time() - float(data.get("updated", 0))
    pid = data.get("supervisor_pid")
    alive = False
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    data["stale"] = (not alive) or age > 3 * float(data.get("interval", 1.0)) + 2.0
    return data
