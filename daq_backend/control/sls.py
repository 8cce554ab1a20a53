"""Detector control of Jungfrau and Eiger through slsdet, with every call bounded in time.

Why: the seed called slsdet straight from the REST handler, so an unreachable detector hung the API.
Here slsdet runs in a child process (:mod:`daq_backend.control.sls_worker`); a call that overruns kills
that child and raises :class:`DetectorUnreachableError`, and the next call starts a fresh one. Settings
are validated as a whole before anything is sent (:func:`validate_settings`).
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from daq_backend.control.base import (
    CAPABILITIES,
    DetectorCommandError,
    DetectorStateError,
    DetectorUnreachableError,
    ParameterError,
    validate_settings,
)

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
WORKER_MODULE = "daq_backend.control.sls_worker"


def client_shm_paths(shm_id: int) -> list[str]:
    """The /dev/shm files slsdet keeps for one shared-memory id (detector + one per module)."""
    base = os.path.join(SHM_DIR, f"slsDetectorPackage_detector_{shm_id}")
    return [p for p in [base, *glob.glob(f"{glob.escape(base)}_module_*")] if os.path.exists(p)]


def remove_client_shm(shm_id: int) -> None:
    """Remove slsdet's shared memory of ``shm_id`` when its worker could not (killed mid-call)."""
    for path in client_shm_paths(shm_id):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _split_hostnames(hostname: str | list[str]) -> list[str]:
    parts = hostname.split("+") if isinstance(hostname, str) else list(hostname)
    hosts = [h.strip() for h in parts if h.strip()]
    if not hosts:
        raise ValueError("hostname: at least one detector module host[:port] is required")
    return hosts


class SlsDetectorControl:
    """:class:`~daq_backend.control.base.DetectorControl` for slsdet Jungfrau/Eiger detectors.

    ``hostname`` is one ``host[:port]`` per module (list or ``"a+b+"``); ``shm_id`` is the slsdet
    shared-memory id, which must be unique per detector on this machine. Connection is lazy: an
    unreachable detector does not fail construction, only the first call.
    """

    def __init__(self, name: str, detector_type: str, hostname: str | list[str], shm_id: int, *,
                 timeout: float = 10.0, connect_timeout: float = 30.0, powerchip: bool | None = None,
                 log_path: str | None = None) -> None:
        kind = detector_type.lower()
        if kind not in CAPABILITIES:
            raise ValueError(f"detector_type: {detector_type!r} not driven by slsdet here "
                             f"(supported: {', '.join(sorted(CAPABILITIES))})")
        self.name = name
        self.detector_type = kind
        self.hostnames = _split_hostnames(hostname)
        self.shm_id = shm_id
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.powerchip = powerchip if kind == "jungfrau" else None
        self.log_path = log_path
        self._caps = CAPABILITIES[kind]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._connected = False
        self._closed = False

    # -- worker process -------------------------------------------------------------------------
    def _spawn(self) -> None:
        # A fresh interpreter, not fork (the parent may run threads: uvicorn, pika) and not
        # multiprocessing's spawn (it re-imports the caller's __main__, which breaks unguarded scripts).
        ours, theirs = socket.socketpair()
        with open(self.log_path or os.devnull, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(theirs.fileno()), str(self.shm_id)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        theirs.close()
        self._proc, self._conn, self._connected = proc, Connection(ours.detach()), False

    def _kill_worker(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc, self._conn, self._connected = None, None, False
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.wait(5)

    def _request(self, op: str, timeout: float, **kwargs: Any) -> Any:
        if self._proc is None or self._proc.poll() is not None:
            self._kill_worker()
            self._spawn()
        assert self._conn is not None
        try:
            self._conn.send((op, kwargs))
            answered = self._conn.poll(timeout)
            reply = self._conn.recv() if answered else None
        except (EOFError, OSError) as exc:
            self._kill_worker()
            raise DetectorUnreachableError(f"{self.name}: slsdet worker died during {op}: {exc}") from None
        if reply is None:
            self._kill_worker()
            raise DetectorUnreachableError(
                f"{self.name}: no answer from {'+'.join(self.hostnames)} to {op} within {timeout:g} s")
        if reply[0] == "ok":
            return reply[1]
        _, kind, parameter, message = reply
        if kind == "unreachable":
            self._connected = False
            raise DetectorUnreachableError(f"{self.name}: {message}")
        if kind == "state":
            raise DetectorStateError(message)
        if kind == "parameter":
            raise ParameterError(parameter or "config", message)
        raise DetectorCommandError(f"{self.name}: {message}")

    def _call(self, op: str, timeout: float | None = None, **kwargs: Any) -> Any:
        if self._closed:
            raise DetectorUnreachableError(f"{self.name}: control is closed")
        wait = (timeout or self.timeout) + self.connect_timeout
        if not self._lock.acquire(timeout=wait):
            raise DetectorUnreachableError(f"{self.name}: detector busy, an earlier command is still waiting")
        try:
            if not self._connected:
                self._request("connect", self.connect_timeout, hostname=self.hostnames,
                              detector_type=self.detector_type, powerchip=self.powerchip)
                self._connected = True
            return self._request(op, timeout or self.timeout, **kwargs)
        finally:
            self._lock.release()

    # -- DetectorControl ------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect now instead of at the first call (raises :class:`DetectorUnreachableError`)."""
        self._call("status")

    def get_config(self) -> dict[str, Any]:
        return {"det_name": self.name, **self._call("get_config")}

    def set_config(self, values: dict[str, Any]) -> dict[str, Any]:
        settings = validate_settings(values, self._caps)
        given = settings.given()
        if given:
            self._call("apply", values=given)
        return self.get_config()

    def start(self) -> None:
        self._call("start")

    def stop(self) -> None:
        self._call("stop")

    def status(self) -> str:
        return str(self._call("status"))

    def configure_receiver(self, dst_ip: str, start_udp_port: int, src_ip: str | None = None) -> None:
        """Point module i at ``dst_ip:start_udp_port + i`` (two ports per module on Eiger).

        ``src_ip`` defaults to 127.0.0.1 when ``dst_ip`` is a loopback address (virtual detectors).
        """
        if not 0 < start_udp_port < 65536:
            raise ParameterError("start_udp_port", f"must be 1-65535, got {start_udp_port}")
        if src_ip is None and dst_ip.startswith("127."):
            src_ip = "127.0.0.1"
        # Setting the destination IP resolves MAC addresses (about 1 s per module on a virtual server).
        self._call("configure_udp", timeout=self.connect_timeout, dst_ip=dst_ip, start_port=start_udp_port,
                   src_ip=src_ip)

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
            if self._proc is not None and self._proc.poll() is None and self._conn is not None:
                try:
                    self._request("free", self.timeout)
                    self._request("shutdown", self.timeout)
                except (DetectorUnreachableError, DetectorCommandError) as exc:
                    log.warning("%s: freeing slsdet shared memory failed: %s", self.name, exc)
                if self._proc is not None:
                    try:
                        self._proc.wait(self.timeout)
                    except subprocess.TimeoutExpired:
                        log.warning("%s: slsdet worker did not exit, killing it", self.name)
            self._kill_worker()
            remove_client_shm(self.shm_id)

    def __enter__(self) -> SlsDetectorControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SlsDetectorControl(name={self.name!r}, detector_type={self.detector_type!r}, "
                f"hostname={'+'.join(self.hostnames)!r}, shm_id={self.shm_id})")
