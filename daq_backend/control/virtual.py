"""Run slsDetectorPackage's virtual detector servers and ``slsReceiver`` as managed child processes.

Why: tests and benchmarks need a detector nobody here wrote. The virtual servers have quirks handled
here once: the control server forks its stop server through ``system("... &")`` (so it is not our
child: it is found by its command line and stopped by PID), the stop server listens on PORT+1 only after
a start-up delay (~9 s Jungfrau, ~2 s Eiger), and the pair keeps a System V shared-memory segment (key
5678 + PORT) that outlives them unless removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from daq_backend.control.sls import SlsDetectorControl
from daq_backend.control.sls_build import binary_path, ensure_built

SERVER_BINARIES: dict[str, str] = {
    "jungfrau": "jungfrauDetectorServer_virtual",
    "eiger": "eigerDetectorServer_virtual",
}
SERVER_SHM_KEY_BASE = 5678  # slsDetectorServer/src/sharedMemory.c: shmget(SHM_KEY + port, ...)
IPC_RMID = 0
PORT_RANGE = (20000, 32000)  # below the usual ephemeral range, so outgoing connections do not collide


class VirtualServerError(RuntimeError):
    """A virtual server or receiver did not come up; the message includes the tail of its log."""


def port_free(port: int) -> bool:
    """True when nothing listens on TCP ``port`` on any address (a bind would succeed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port_pair(rng: random.Random | None = None) -> int:
    """A port P with P and P+1 free (control and stop server)."""
    rng = rng or random.Random()
    for _ in range(500):
        port = rng.randrange(*PORT_RANGE) & ~1
        if port_free(port) and port_free(port + 1):
            return port
    raise VirtualServerError(f"no free TCP port pair found in {PORT_RANGE}")


def allocate_shm_id(rng: random.Random | None = None) -> int:
    """An slsdet shared-memory id that no /dev/shm file uses yet (one per detector and client)."""
    rng = rng or random.Random()
    for _ in range(1000):
        shm_id = rng.randrange(100, 30000)
        if not Path(f"/dev/shm/slsDetectorPackage_detector_{shm_id}").exists():
            return shm_id
    raise VirtualServerError("no unused slsdet shared-memory id found")


def remove_sysv_shm(key: int) -> bool:
    """Remove the System V segment ``key`` if it exists; True if one was removed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    shm_id = libc.shmget(ctypes.c_int(key), ctypes.c_size_t(0), ctypes.c_int(0))
    if shm_id < 0:
        return False
    return libc.shmctl(ctypes.c_int(shm_id), ctypes.c_int(IPC_RMID), None) == 0


def _listening(proc: psutil.Process, port: int) -> bool:
    try:
        conns = proc.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def _log_tail(path: Path, n_chars: int = 3000) -> str:
    try:
        lines = path.read_bytes().decode(errors="replace").replace("\x1b", "").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(line.strip() for line in lines if line.strip())[-n_chars:] or "(empty log)"


def _stop_process(proc: psutil.Process | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, one exact process; reaps it if it is our child.

    A ``psutil.Process`` taken when the process was found refuses to signal a recycled PID.
    """
    if proc is None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
    except psutil.NoSuchProcess:
        pass


@dataclasses.dataclass
class VirtualDetectorServer:
    """One virtual detector module: control server on ``port``, stop server on ``port + 1``.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``shm_id`` is a fresh slsdet
    shared-memory id reserved for the client that drives this detector.
    """

    detector_type: str
    port: int = 0
    host: str = "127.0.0.1"
    shm_id: int = 0
    log_path: Path | None = None
    startup_timeout: float = 90.0
    pid: int | None = None
    stop_pid: int | None = None
    _popen: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    _procs: list[psutil.Process] = dataclasses.field(default_factory=list, repr=False)
    _own_log: bool = dataclasses.field(default=False, repr=False)

    @property
    def stop_port(self) -> int:
        return self.port + 1

    @property
    def hostname(self) -> str:
        """slsdet ``hostname`` entry for this module."""
        return f"{self.host}:{self.port}"

    @property
    def sysv_shm_key(self) -> int:
        return SERVER_SHM_KEY_BASE + self.port

    def start(self) -> VirtualDetectorServer:
        """Build if needed, start, and wait until both control and stop ports listen."""
        kind = self.detector_type.lower()
        if kind not in SERVER_BINARIES:
            raise ValueError(f"detector_type: no virtual server for {self.detector_type!r} "
                             f"(have: {', '.join(SERVER_BINARIES)})")
        ensure_built()
        binary = binary_path(SERVER_BINARIES[kind])
        if not self.shm_id:
            self.shm_id = allocate_shm_id()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"sls-{kind}-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        explicit_port = bool(self.port)
        for _attempt in range(1 if explicit_port else 5):
            if not explicit_port:
                self.port = free_port_pair()
            if self._launch(binary):
                return self
            self.stop()
        raise VirtualServerError(
            f"{kind} virtual server did not come up on port {self.port} within {self.startup_timeout:g} s; "
            f"log {self.log_path}:\n{_log_tail(self.log_path)}")

    def _launch(self, binary: Path) -> bool:
        assert self.log_path is not None
        with self.log_path.open("ab") as out:
            # --port (not -p) so the stop server's command line reads "... --stopserver --port P+1".
            self._popen = subprocess.Popen([str(binary), "--port", str(self.port)], stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=str(binary.parent), start_new_session=True)
        self.pid = self._popen.pid
        control = psutil.Process(self.pid)
        self._procs = [control]
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                return False
            if self.stop_pid is None:
                self._adopt_stop_server(binary)
            if len(self._procs) == 2 and _listening(control, self.port) and \
                    _listening(self._procs[1], self.stop_port):
                return True
            time.sleep(0.2)
        return False

    def _adopt_stop_server(self, binary: Path) -> None:
        """The stop server is re-parented to init, not our child: match its exact command line."""
        wanted_tail = ["--stopserver", "--port", str(self.stop_port)]
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0] == str(binary) and cmdline[-3:] == wanted_tail:
                self.stop_pid = proc.pid
                self._procs.append(proc)
                return

    def stop(self) -> None:
        """Stop the stop server and the control server by PID, then remove their shared memory."""
        if self.stop_pid is None and self.pid is not None and self.port:
            # the control server may have forked it after our last look
            self._adopt_stop_server(binary_path(SERVER_BINARIES[self.detector_type.lower()]))
        for proc in reversed(self._procs):
            _stop_process(proc)
        if self._popen is not None:
            self._popen.wait(10)
        self.pid = self.stop_pid = None
        self._popen, self._procs = None, []
        if self.port:
            remove_sysv_shm(self.sysv_shm_key)

    def make_control(self, name: str | None = None, shm_id: int | None = None,
                     **kwargs: Any) -> SlsDetectorControl:
        """An :class:`SlsDetectorControl` for this module (Jungfrau: chip powered on); caller closes it."""
        kind = self.detector_type.lower()
        if kind == "jungfrau":
            kwargs.setdefault("powerchip", True)
        return SlsDetectorControl(name or f"virtual-{kind}-{self.port}", kind, self.hostname,
                                  shm_id or self.shm_id, **kwargs)

    def cleanup(self) -> None:
        """Stop and also delete the log file if we created it."""
        self.stop()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> VirtualDetectorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@dataclasses.dataclass
class SlsReceiverProcess:
    """The C++ reference receiver (``slsReceiver -p TCPPORT``), for side-by-side benchmarks."""

    tcp_port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    startup_timeout: float = 60.0
    pid: int | None = None
    _popen: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    _proc: psutil.Process | None = dataclasses.field(default=None, repr=False)
    _own_log: bool = dataclasses.field(default=False, repr=False)

    @property
    def rx_hostname(self) -> str:
        """slsdet ``rx_hostname`` entry for this receiver."""
        return f"{self.host}:{self.tcp_port}"

    def start(self) -> SlsReceiverProcess:
        binary = ensure_built() / "slsReceiver"
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="slsReceiver-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        explicit_port = bool(self.tcp_port)
        for _attempt in range(1 if explicit_port else 5):
            if not explicit_port:
                self.tcp_port = free_port_pair()
            with self.log_path.open("ab") as out:
                self._popen = subprocess.Popen([str(binary), "-p", str(self.tcp_port)], stdout=out,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True)
            self.pid = self._popen.pid
            self._proc = psutil.Process(self.pid)
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline and self._popen.poll() is None:
                if _listening(self._proc, self.tcp_port):
                    return self
                time.sleep(0.1)
            self.stop()
        raise VirtualServerError(f"slsReceiver did not listen on {self.tcp_port}; log {self.log_path}:\n"
                                 f"{_log_tail(self.log_path)}")

    def stop(self) -> None:
        _stop_process(self._proc)
        if self._popen is not None:
            self._popen.wait(10)
        self.pid, self._popen, self._proc = None, None, None

    def cleanup(self) -> None:
        self.stop()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> SlsReceiverProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
