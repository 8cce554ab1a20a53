"""Applying a new detector config to a running DAQ: the checks, the request and its answer.

The supervisor of a detector (``std-daq up``) binds a ZMQ REP socket at ``ipc.supervisor_address``.
The REST API (``POST /daq/config``, a ``dr`` change on ``/detector``) sends it
``{"op": "apply_config", "config": {...}}``; the supervisor validates the config, runs
:func:`preflight` (ports free, host an address of this host, room for the rings in ``/dev/shm``),
restarts the processes the change concerns (``topology.restart_set``), waits until each of them is
ready again, keeps the new config in its live config file (and in the user's file it was started
with), and answers ``{"ok": true, "message", "restarted", "seconds", "saved"}`` once the new config
is live. Anything that goes wrong is answered ``{"ok": false, "reason"}``; when a restarted process
does not come up the supervisor restores the old config first, so a refused config leaves the old one
running. :class:`SupervisorClient` is the asking side.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig

#: seconds a client waits for an apply (stopping, restarting and the rings' allocation included)
APPLY_TIMEOUT = 180.0
#: seconds a client waits for the supervisor to answer at all
PING_TIMEOUT = 5.0
SHM_DIR = "/dev/shm"


class ConfigNotApplied(RuntimeError):
    """The supervisor refused the config or could not make it live; the old config runs."""


class SupervisorUnreachable(ConnectionError):
    """No supervisor answers for this detector (not started by ``std-daq up``, or gone)."""


@dataclass(frozen=True)
class ApplyResult:
    """The answer to an apply that succeeded."""

    message: str
    restarted: list[str] = field(default_factory=list)
    seconds: float = 0.0
    saved: str | None = None


def ring_bytes(config: DetectorConfig) -> int:
    """Bytes of ``/dev/shm`` the detector's rings take (frame ring per module + image ring)."""
    from daq_backend.detectors import layout_for

    frames = layout_for(config).frame_nbytes * config.frame_ring_slots * len(config.required_modules)
    return frames + config.image_nbytes * config.image_ring_slots


def _bind_problem(host: str, port: int) -> str | None:
    """Why a UDP socket cannot bind ``host:port`` right now (None: it can)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((host, port))
    except socket.gaierror as exc:
        return f"udp_host: cannot resolve {host!r} ({exc.strerror})"
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"udp_host: {host} is not an address of this host"
        if exc.errno == errno.EADDRINUSE:
            return f"start_udp_port: UDP port {port} on {host} is in use by another process"
        if exc.errno == errno.EACCES:
            return f"start_udp_port: UDP port {port} needs root (ports below 1024 are privileged)"
        return f"udp_host/start_udp_port: cannot bind UDP {host}:{port}: {exc.strerror}"
    return None


def preflight(old: DetectorConfig, new: DetectorConfig, shm_dir: str = SHM_DIR) -> list[str]:
    """What would stop ``new`` from running where ``old`` runs now (empty: nothing found).

    Ports the running receivers hold are theirs to give up and not checked; the current rings count as
    free space, as a restart replaces them."""
    problems: list[str] = []
    last = new.udp_port(max(new.required_modules))
    if last > 65535:
        problems.append(f"start_udp_port: the modules need ports {new.start_udp_port}..{last}, "
                        "beyond 65535")
    else:
        held = {old.udp_port(m) for m in old.required_modules}
        for module in new.required_modules:
            port = new.udp_port(module)
            if port in held:
                continue
            problem = _bind_problem(new.udp_host, port)
            if problem:
                problems.append(problem)
                break
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return problems
    free = st.f_bavail * st.f_frsize + ring_bytes(old)
    need = ring_bytes(new)
    if need > free:
        problems.append(f"frame_ring_slots/image_ring_slots: the rings need {need / 2**20:.0f} MiB of "
                        f"{shm_dir}, {free / 2**20:.0f} MiB are free (counting the current rings): "
                        "use fewer slots or free space")
    return problems


class SupervisorClient:
    """Asks the supervisor of ``detector_name`` (on this host, same ``STD_DAQ_IPC_DIR``)."""

    def __init__(self, detector_name: str, timeout: float = APPLY_TIMEOUT,
                 context: zmq.Context | None = None) -> None:
        self.detector_name = detector_name
        self.address = ipc.supervisor_address(detector_name)
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()

    def _ask(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        path = self.address.removeprefix("ipc://")
        if not os.path.exists(path):
            raise ConfigNotApplied(
                f"no supervisor runs detector {self.detector_name!r} here (no {path}): "
                "a config can only be applied to a DAQ started with `std-daq up`")
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.address)
            sock.send(json.dumps(message).encode())
            if not sock.poll(int(timeout * 1000)):
                raise SupervisorUnreachable(
                    f"the supervisor of {self.detector_name!r} did not answer within {timeout:g} s")
            answer = json.loads(sock.recv())
        finally:
            sock.close()
        if not isinstance(answer, dict):
            raise SupervisorUnreachable(f"the supervisor of {self.detector_name!r} answered {answer!r}")
        return answer

    def ping(self) -> dict[str, Any]:
        return self._ask({"op": "ping"}, PING_TIMEOUT)

    def apply(self, config: DetectorConfig) -> ApplyResult:
        """Make ``config`` live; returns once it is, raises :class:`ConfigNotApplied` with the reason."""
        self.ping()  # fails fast when the socket file outlived its supervisor
        answer = self._ask({"op": "apply_config", "config": config.to_json_dict()}, self.timeout)
        if not answer.get("ok"):
            raise ConfigNotApplied(str(answer.get("reason", "refused without a reason")))
        return ApplyResult(message=str(answer.get("message", "live")),
                           restarted=[str(n) for n in answer.get("restarted", [])],
                           seconds=float(answer.get("seconds", 0.0)), saved=answer.get("saved"))
