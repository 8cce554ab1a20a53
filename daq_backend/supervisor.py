"""Supervisor of one detector's processes (``std-daq up CONFIG``).

Starts one OS process per service of the detector's :class:`~daq_backend.topology.Topology`
(receivers, assembler, writer agent, h5 writer, REST API, ...; plus any ``ServiceSpec`` handed in),
restarts a crashed one with exponential backoff, collects every process' stats and writes them to the
detector's status file (``ipc.status_file``) for ``std-daq status``. On SIGTERM/Ctrl-C (or ``stop()``)
it terminates the children by PID, waits for them, and removes the shared-memory segments and ipc
socket files of *its* detector that a killed owner left behind.

Every child reads the supervisor's *live* config file (``ipc.config_file``). A new config reaches the
running pipeline only through the supervisor: its control socket (``ipc.supervisor_address``, see
``reconfigure``) takes ``apply_config``; the supervisor checks it, restarts what the change concerns,
answers once the new config is live (or refuses with the reason, the old config still running) and
saves it to the config file it was started with.

When the supervisor dies, its children go with it: each gets ``PR_SET_PDEATHSIG`` (SIGTERM at once)
and a :class:`~daq_backend.guardian.Guardian` process holds a pidfd of each; it terminates them (and
their own children), SIGKILLs what has not exited after its grace period, and removes the detector's
rings and sockets — within ``messages.FAULT_BOUND`` of the death. Should the guardian be gone as well,
the next ``std-daq up`` of the detector stops what the dead supervisor left running (recognised by
the ``STD_DAQ_SUPERVISOR`` mark in their environment) and removes the leftovers before it starts.
Children run in their own session, so a terminal's Ctrl-C reaches only the supervisor, which then
stops them in order. The kernel sends ``PR_SET_PDEATHSIG`` when the *thread* that started a child
ends, so a supervisor starts every child from the thread that runs it (``run()``; the control socket
is served there too), which lives as long as the children.
A command-line child's stderr is a pipe the supervisor reads: each line goes on to the supervisor's
stderr and the newest ones, with the supervisor's own messages, into the status file
(``daq_backend.logtail``).

A child that *cannot* start (its port is taken, its host has no such address, /dev/shm has no room
for its ring, its config no longer loads) exits with ``EXIT_CANNOT_START`` after writing why to the
file named by ``STD_DAQ_FAILURE_FILE`` (``component.build_component``): restarting it would fail the
same way, so the supervisor logs the reason once, marks the service ``failed`` in the status
(``std-daq status`` shows it) and leaves it down; the other services keep running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import zmq

from daq_backend import ipc
from daq_backend.broker.transport import redact_url
from daq_backend.component import EXIT_CANNOT_START, FAILURE_FILE_ENV, SERVICE_NAME_ENV, run_service
from daq_backend.config import ConfigError, DetectorConfig, parse_config
from daq_backend.guardian import DEFAULT_GRACE, Guardian
from daq_backend.logtail import LogTail, TailHandler
from daq_backend.ram_buffer import shm_path
from daq_backend.stats import StatsCollector
from daq_backend.topology import ServiceSpec, Topology, readout_services, restart_set

__all__ = ["ServiceSpec", "Supervisor", "read_status", "readout_services", "run_service"]

log = logging.getLogger(__name__)

#: environment mark of a supervised child: ``<detector>:<supervisor instance>``
SUPERVISOR_ENV = "STD_DAQ_SUPERVISOR"
_PR_SET_PDEATHSIG = 1
#: Newest stderr lines per service in the status file (the supervisor keeps more in memory).
STATUS_LOG_LINES = 30
try:  # resolved once here: the child between fork and exec must not load libraries
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGTERM this child when its parent dies, and die now if it already has (the
    parent may have died between the fork and the ``prctl``)."""

    def arm() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def _run_target(target: Callable[..., object], args: tuple[Any, ...], env: dict[str, str],
                parent_pid: int) -> None:
    _die_with_parent(parent_pid)()
    os.environ.update(env)
    target(*args)


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
        self.log = LogTail()  # kept across restarts: a crash's traceback stays visible
        self.log_reader: threading.Thread | None = None
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


class _ApplyFailed(Exception):
    """A restarted service did not come up; the message says which and how."""


class Supervisor:
    """Starts, watches, restarts and stops the processes of one detector (see module doc).

    ``topology``: the detector's processes (default: the readout only, or nothing with
    ``readout=False``); ``extra_services`` run besides them. ``config_path``: the user's config file
    (an applied config is saved there); the children read the live copy, ``topology.config_path``."""

    def __init__(
        self,
        config: DetectorConfig,
        config_path: str | Path | None = None,
        extra_services: Iterable[ServiceSpec] = (),
        *,
        readout: bool = True,
        topology: Topology | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        stable_after: float = 30.0,
        stop_timeout: float = 10.0,
        status_interval: float = 1.0,
        ready_timeout: float = 120.0,
        guardian_grace: float = DEFAULT_GRACE,
        preflight: bool = True,
    ) -> None:
        self.config = config
        self.detector = config.detector_name
        self.user_config_path = Path(config_path) if config_path else None
        self._whole_topology = topology is not None
        self._readout = readout
        if topology is None:
            topology = Topology(config, Path(ipc.config_file(self.detector)), broker_url="", writer=False)
        self.topology = topology
        self.config_path = topology.config_path
        self._extra = list(extra_services)
        services = self._topology_services(topology) + self._extra
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise ValueError(f"service names must be unique, got {names}")
        self.services = services
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.status_interval = status_interval
        self.ready_timeout = ready_timeout
        #: check the host (UDP ports, /dev/shm) before starting the readout (``preflight``)
        self.preflight = preflight and readout
        self.status_path = Path(ipc.status_file(self.detector))
        self.instance = uuid.uuid4().hex[:12]
        self._children = {s.name: _Child(s) for s in services}
        self._stop = threading.Event()
        self._started = False
        self._collector: StatsCollector | None = None
        self._control: zmq.Socket | None = None
        self._guardian: Guardian | None = None
        self._guardian_grace = guardian_grace
        self._next_status = 0.0
        self._lock = threading.Lock()
        self._log = LogTail()
        self._log_handler = TailHandler(self._log, lambda _r, text: text.startswith(f"{self.detector}: "))
        self._applying = False

    def _topology_services(self, topology: Topology) -> list[ServiceSpec]:
        if self._whole_topology:
            return topology.services()
        return topology.readout() if self._readout else []

    @property
    def _mark(self) -> str:
        """The ``STD_DAQ_SUPERVISOR`` value in the environment of this supervisor's processes."""
        return f"{self.detector}:{self.instance}"

    @property
    def _writes_live_config(self) -> bool:
        return self.user_config_path is None or self.user_config_path.resolve() != self.config_path.resolve()

    # -- public ------------------------------------------------------------------------------
    def check_can_start(self) -> dict[str, Any] | None:
        """Refuse to start a detector that is up already, or whose dead supervisor still runs
        (RuntimeError), or that this host cannot run (``preflight``: a ConfigError naming the field
        and the fix). Returns a dead supervisor's status (to take over from), None when there is none."""
        other: dict[str, Any] | None = None
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
            pid = other.get("supervisor_pid")
            if isinstance(pid, int) and pid != os.getpid() and not _gone(pid):
                raise RuntimeError(
                    f"{self.detector}: its supervisor (pid {pid}) has not updated {self.status_path} for "
                    f"{time.time() - float(other.get('updated', 0)):.0f} s but still runs: stop it first "
                    "(or, if that pid is no std-daq supervisor, remove the status file)"
                )
        if self.preflight and other is None:  # a dead one's processes may still hold the ports
            from daq_backend.preflight import check_before_start

            check_before_start(self.config)
        return other

    def start(self) -> None:
        """Spawn every service (returns at once; ``run()`` / ``poll_once()`` watch them).

        Raises RuntimeError when a live supervisor already runs this detector; a dead one's leftovers
        (orphaned processes, rings, sockets) are removed first."""
        if self._started:
            return
        other = self.check_can_start()
        if other is not None:
            self._take_over(other)
            if self.preflight:
                from daq_backend.preflight import check_before_start

                check_before_start(self.config)
        self._started = True
        log.addHandler(self._log_handler)
        try:
            if self._writes_live_config:
                self._write_live_config(self.config)
            self._collector = StatsCollector(self.detector)
            self._guardian = Guardian(self.status_path, self._guardian_grace,
                                      env={SUPERVISOR_ENV: self._mark}).start()
            self._guardian.leftovers(self._leftover_paths())
            self._bind_control()
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
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                previous[sig] = signal.signal(sig, lambda signum, _f: self._on_signal(signum))
        try:
            while not self._stop.is_set():
                self.poll_once()
                self._serve_control(0.1)
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
            "instance": self.instance,
            "guardian_pid": self._guardian.pid if self._guardian is not None else None,
            "config": str(self.user_config_path or self.config_path),
            "live_config": str(self.config_path),
            "updated": time.time(),
            "interval": self.status_interval,
            "broker": redact_url(self.topology.broker_url),
            "rest_url": self.topology.rest_url,
            "services": services,
            "logs": {"supervisor": self._log.summary(STATUS_LOG_LINES)}
            | {name: child.log.summary(STATUS_LOG_LINES) for name, child in self._children.items()},
        }

    def pids(self) -> dict[str, int | None]:
        return {name: child.pid for name, child in self._children.items()}

    def shutdown(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after ``stop_timeout``) and clean up leftovers."""
        self._stop.set()
        if not self._started:
            return
        with self._lock:
            self._stop_children([c for c in self._children.values() if c.proc is not None])
        for child in self._children.values():
            if child.log_reader is not None:  # the last lines a stopping child wrote
                child.log_reader.join(2.0)
        log.removeHandler(self._log_handler)
        self._remove_leftovers()
        if self._control is not None:
            self._control.close()
            self._control = None
            ipc.unlink_ipc(ipc.supervisor_address(self.detector))
        if self._collector is not None:
            self._collector.close()
            self._collector = None
        if self._guardian is not None:
            self._guardian.close()
            self._guardian = None
        self.status_path.unlink(missing_ok=True)
        if self._writes_live_config:
            self.config_path.unlink(missing_ok=True)
        self._started = False

    # -- applying a new config ----------------------------------------------------------------
    def apply_config(self, data: Any) -> dict[str, Any]:
        """Make the config ``data`` (a detector JSON object) live; the answer of ``reconfigure``."""
        from daq_backend.reconfigure import preflight

        started = time.monotonic()
        try:
            new = parse_config(data)
        except ConfigError as exc:
            return {"ok": False, "reason": str(exc)}
        if new.detector_name != self.detector:
            return {"ok": False, "reason": f"detector_name cannot change on a running DAQ "
                                           f"({self.detector!r} -> {new.detector_name!r})"}
        old = self.config
        if new == old:
            return {"ok": True, "message": "the config is live (unchanged, nothing restarted)",
                    "restarted": [], "seconds": 0.0, "saved": None}
        problems = preflight(old, new)
        if problems:
            return {"ok": False, "reason": "; ".join(problems)}
        self._applying = True
        try:
            restarted = self._transition(old, new)
        except _ApplyFailed as exc:
            reason = f"{exc}; the previous config was restored"
            try:
                self._transition(new, old)
            except _ApplyFailed as again:
                reason = (f"{exc}; restoring the previous config failed too ({again}): "
                          "it keeps being restarted")
            self._write_status()
            return {"ok": False, "reason": reason}
        finally:
            self._applying = False
        saved = self._save_user_config(new)
        took = time.monotonic() - started
        self._write_status()
        what = ", ".join(restarted) if restarted else "nothing"
        message = f"the config is live after {took:.1f} s (restarted: {what})"
        if saved is None and self.user_config_path is not None:
            message += f"; {self.user_config_path} was not updated"
        log.info("%s: %s", self.detector, message)
        return {"ok": True, "message": message, "restarted": restarted, "seconds": round(took, 3),
                "saved": saved}

    def _transition(self, old: DetectorConfig, new: DetectorConfig) -> list[str]:
        """Restart what the change ``old`` -> ``new`` concerns and wait until it is ready."""
        topology = self.topology.with_config(new)
        new_specs = {s.name: s for s in self._topology_services(topology)}
        old_specs = {s.name: s for s in self._topology_services(self.topology)}
        again = restart_set(old, new, old_specs.values()) | restart_set(old, new, new_specs.values())
        stop_names = (again & set(old_specs)) | (set(old_specs) - set(new_specs))
        start_names = (again & set(new_specs)) | (set(new_specs) - set(old_specs))
        with self._lock:
            children = dict(self._children)
            # downstream first, so that no reader sees its producer vanish and come back under it
            stopping = [children[n] for n in reversed(list(old_specs)) if n in stop_names]
            self._stop_children(stopping)
            for child in stopping:
                self._remove_service_leftovers(child.spec)
            self._write_live_config(new)
            self.config = new
            self.topology = topology
            self.services = list(new_specs.values()) + self._extra
            starting: list[_Child] = []
            for name, spec in new_specs.items():  # upstream first
                child = children.get(name) or _Child(spec)
                child.spec = spec
                children[name] = child
                if name in start_names:
                    child.backoff, child.next_start = 0.0, None
                    self._spawn(child)
                    starting.append(child)
            self._children = {s.name: children[s.name] for s in self.services}
        if self._guardian is not None:
            self._guardian.leftovers(self._leftover_paths())
        self._wait_ready(starting)
        return [c.spec.name for c in starting]

    def _wait_ready(self, children: list[_Child]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = list(children)
        while pending:
            if self._collector is not None:
                self._collector.drain()
            latest = self._collector.latest if self._collector is not None else {}
            for child in list(pending):
                code = child.poll()
                if code is not None:
                    raise _ApplyFailed(f"{child.spec.name} exited with code {code} "
                                       f"{time.monotonic() - child.started:.1f} s after its restart")
                ran = time.monotonic() - child.started
                if child.spec.reports_stats:
                    report = latest.get(child.spec.name)
                    ready = report is not None and report.get("pid") == child.pid
                else:
                    ready = ran >= child.spec.ready_after
                if ready:
                    pending.remove(child)
            if not pending:
                return
            if time.monotonic() > deadline or self._stop.is_set():
                names = ", ".join(c.spec.name for c in pending)
                raise _ApplyFailed(f"{names} not ready within {self.ready_timeout:g} s of the restart")
            time.sleep(0.05)

    def _save_user_config(self, config: DetectorConfig) -> str | None:
        """Keep the user's config file equal to what runs (the next ``up`` starts the same)."""
        path = self.user_config_path
        if path is None or not self._writes_live_config:
            return str(path) if path is not None else None
        try:
            _write_json(path, config.to_json_dict())
        except OSError as exc:
            log.warning("%s: applied config not saved to %s: %s", self.detector, path, exc)
            return None
        return str(path)

    def _write_live_config(self, config: DetectorConfig) -> None:
        _write_json(self.config_path, config.to_json_dict())

    # -- the control socket -------------------------------------------------------------------
    def _bind_control(self) -> None:
        address = ipc.supervisor_address(self.detector)
        ipc.unlink_ipc(address)  # a dead supervisor's socket file (the status said it is stale)
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        self._control = sock

    def _serve_control(self, timeout: float) -> None:
        """Answer one control request if one comes within ``timeout`` s (else just wait)."""
        if self._control is None:
            self._stop.wait(timeout)
            return
        if not self._control.poll(int(timeout * 1000)):
            return
        raw = self._control.recv()
        try:
            request = json.loads(raw)
            op = request.get("op") if isinstance(request, dict) else None
        except ValueError:
            request, op = {}, None
        if op == "ping":
            answer: dict[str, Any] = {"ok": True, "detector": self.detector, "pid": os.getpid()}
        elif op == "apply_config":
            try:
                answer = self.apply_config(request.get("config"))
            except Exception as exc:  # the answer must come, whatever happened
                log.exception("%s: applying a config failed", self.detector)
                answer = {"ok": False, "reason": f"the supervisor failed applying it: {exc}"}
        else:
            answer = {"ok": False,
                      "reason": f"unknown request {raw[:80]!r} (expected op ping or apply_config)"}
        self._control.send(json.dumps(answer).encode())

    # -- internals ---------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        log.info("%s: signal %d, stopping all services", self.detector, signum)
        self._stop.set()

    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        own = {**spec.env, SERVICE_NAME_ENV: spec.name, "STD_DAQ_IPC_DIR": ipc.ipc_dir(),
               SUPERVISOR_ENV: self._mark}
        failure = self._failure_file(spec.name)
        failure.unlink(missing_ok=True)
        own[FAILURE_FILE_ENV] = str(failure)
        if spec.argv is not None:
            child.proc = subprocess.Popen(
                list(spec.argv), env={**os.environ, **own}, start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()), stderr=subprocess.PIPE,
            )
            assert child.proc.stderr is not None
            child.log_reader = child.log.follow(child.proc.stderr, spec.name)
        else:
            ctx = multiprocessing.get_context("spawn")
            proc = ctx.Process(target=_run_target, args=(spec.target, spec.args, own, os.getpid()),
                               name=spec.name)
            proc.start()
            child.proc = proc
        pid = child.proc.pid
        assert pid is not None  # started
        if self._guardian is not None:
            self._guardian.watch(pid, spec.name)
        child.started = time.monotonic()
        child.next_start = None
        child.exit_code = None
        child.failed = None
        log.info("%s: %s started, pid %d", self.detector, spec.name, pid)

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

    def _stop_children(self, children: list[_Child]) -> None:
        """SIGTERM, wait up to ``stop_timeout``, SIGKILL; the children end with ``proc`` None."""
        children = [c for c in children if c.proc is not None]
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

    @staticmethod
    def _reap(child: _Child) -> None:
        if isinstance(child.proc, subprocess.Popen):
            child.proc.wait()
        elif child.proc is not None:
            child.proc.join()

    @staticmethod
    def _signal(child: _Child, sig: int) -> None:
        pid = child.pid
        if pid is None:
            return
        try:
            os.kill(pid, sig)
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

    def _leftover_names(self) -> tuple[set[str], set[str]]:
        """This detector's ring names and ipc addresses (those of every possible module included)."""
        det = self.detector
        names = {ipc.frame_ring_name(det, m) for m in range(self.config.n_modules)}
        names.add(ipc.image_ring_name(det))
        addresses = {ipc.supervisor_address(det), ipc.stats_address(det)}
        for spec in self.services:
            names.update(spec.shm_names)
            addresses.update(spec.ipc_addresses)
        return names, addresses

    def _leftover_paths(self) -> list[str]:
        names, addresses = self._leftover_names()
        paths = [str(shm_path(n)) for n in names]
        paths += [a.removeprefix("ipc://") for a in addresses if a.startswith("ipc://")]
        if self._writes_live_config:
            paths.append(str(self.config_path))
        return sorted(paths)

    def _remove_leftovers(self) -> None:
        """Unlink this detector's rings and ipc socket files that a killed owner left behind."""
        names, addresses = self._leftover_names()
        addresses -= {ipc.supervisor_address(self.detector), ipc.stats_address(self.detector)}
        self._unlink(names, addresses)
        for spec in self.services:
            self._failure_file(spec.name).unlink(missing_ok=True)

    def _remove_service_leftovers(self, spec: ServiceSpec) -> None:
        self._unlink(set(spec.shm_names), set(spec.ipc_addresses))

    def _unlink(self, names: set[str], addresses: set[str]) -> None:
        for name in sorted(names):
            path = shm_path(name)
            if path.exists():
                log.warning("%s: removing leftover shared memory %s", self.detector, path)
                path.unlink(missing_ok=True)
            # a ring still being built when its process was stopped (``.<name>.<pid>.creating``)
            for building in path.parent.glob(f".{name}.*.creating"):
                building.unlink(missing_ok=True)
        for address in sorted(addresses):
            ipc.unlink_ipc(address)

    def _take_over(self, stale: dict[str, Any]) -> None:
        """A dead supervisor's status file: let its guardian finish, stop the processes it left
        running, remove its leftovers."""
        mark = f"{self.detector}:{stale.get('instance')}" if stale.get("instance") else None
        deadline = time.monotonic() + self._guardian_grace + self.stop_timeout
        guardian = stale.get("guardian_pid")
        while (mark and isinstance(guardian, int) and _environ_mark(guardian) == mark
               and time.monotonic() < deadline):
            time.sleep(0.05)  # it is taking the dead supervisor's processes down
        orphans = _marked_processes(mark) if mark else []  # its children and theirs
        names = {s.get("pid"): s.get("name") for s in stale.get("services", []) if isinstance(s, dict)}
        for pid in orphans:
            log.warning("%s: %s (pid %d) of a dead supervisor still runs: stopping it",
                        self.detector, names.get(pid, "a process"), pid)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        deadline = time.monotonic() + self.stop_timeout
        while orphans and time.monotonic() < deadline:
            orphans = [p for p in orphans if _environ_mark(p) == mark]
            time.sleep(0.05)
        for pid in orphans:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self._remove_leftovers()
        ipc.unlink_ipc(ipc.stats_address(self.detector))
        self.status_path.unlink(missing_ok=True)

    def _write_status(self) -> None:
        self._next_status = time.monotonic() + self.status_interval
        if not self._started:
            return
        _write_json(self.status_path, self.status())


def _write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically (readers see the old or the new content, never a part)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _gone(pid: int) -> bool:
    """Process ``pid`` does not exist or is a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _marked_processes(mark: str) -> list[int]:
    """Live processes whose environment carries ``STD_DAQ_SUPERVISOR=<mark>`` (a supervisor's
    children and the processes they started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _environ_mark(int(entry)) == mark:
            pids.append(int(entry))
    return pids


def _environ_mark(pid: int) -> str | None:
    """The ``STD_DAQ_SUPERVISOR`` mark in the environment of process ``pid`` (None: gone, a zombie,
    or not ours)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{SUPERVISOR_ENV}=".encode()
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


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
