"""Checks of a detector config against this host, before its processes start (``std-daq up``).

``config.py`` refuses at load what a file alone gets wrong (overlapping modules, ports beyond 65535, a
``udp_host`` that does not resolve). What only this host can tell is checked here, once, so that
``std-daq up`` refuses with one line naming the field and the fix instead of starting a process that
cannot work: whether the receivers can bind their UDP ports on ``udp_host`` (taken by another
process, an address of another host, a privileged port) and whether /dev/shm has room for the
detector's rings. A process that fails anyway (the port was taken in between) exits with
``supervisor.EXIT_CANNOT_START`` and is reported as failed, not restarted.
"""

from __future__ import annotations

import errno
import os
import socket

from daq_backend import ipc
from daq_backend.config import ConfigError, DetectorConfig
from daq_backend.detectors import layout_for
from daq_backend.ram_buffer import SHM_DIR, ring_nbytes, shm_path

MIB = 1 << 20


class PreflightError(ConfigError):
    """The detector's config cannot work on this host; the message names the field and the fix."""


def readout_rings(config: DetectorConfig) -> dict[str, int]:
    """Ring name -> bytes of /dev/shm, for every ring the readout of ``config`` creates."""
    frame_nbytes = layout_for(config).frame_nbytes
    rings = {
        ipc.frame_ring_name(config.detector_name, m): ring_nbytes(frame_nbytes, config.frame_ring_slots)
        for m in config.required_modules
    }
    image = ring_nbytes(config.image_nbytes, config.image_ring_slots)
    rings[ipc.image_ring_name(config.detector_name)] = image
    return rings


def check_shm(config: DetectorConfig) -> None:
    """/dev/shm has room for every ring of the readout (each is reserved in full when created)."""
    rings = readout_rings(config)
    needed = sum(rings.values())
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    if needed <= free:
        return
    held = sum(shm_path(name).stat().st_size for name in rings if shm_path(name).exists())
    leftovers = f" ({held / MIB:.0f} MiB of it held by leftover rings of this detector)" if held else ""
    frame_ring = next(iter(rings.values()))
    image_ring = rings[ipc.image_ring_name(config.detector_name)]
    raise PreflightError(
        f"frame_ring_slots/image_ring_slots: the rings of {config.detector_name} need {needed / MIB:.0f} MiB "
        f"of {SHM_DIR}, {free / MIB:.0f} MiB are free{leftovers}: lower image_ring_slots (now "
        f"{config.image_ring_slots}: {image_ring / MIB:.0f} MiB) or frame_ring_slots (now "
        f"{config.frame_ring_slots}: {frame_ring / MIB:.0f} MiB per module), or enlarge {SHM_DIR}"
    )


def check_udp_ports(config: DetectorConfig) -> None:
    """Every receiver can bind its port on ``udp_host`` (tried, then released at once)."""
    host = config.udp_host
    for module in config.required_modules:
        port = config.udp_port(module)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise PreflightError(_bind_problem(exc, host, port, module)) from None


def _bind_problem(exc: OSError, host: str, port: int, module: int) -> str:
    where = f"UDP {host}:{port} (module {module})"
    if exc.errno == errno.EADDRINUSE:
        return (f"start_udp_port: {where} is in use by another process: choose another start_udp_port "
                "or stop what listens there (is this detector up already under another name?)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"udp_host: {host} is not an address of this host ({exc.strerror}): use the address of "
                "the interface the detector sends to (127.0.0.1 for a simulator on this host)")
    if exc.errno == errno.EACCES:
        return (f"start_udp_port: binding {where} is not permitted ({exc.strerror}): "
                "ports below 1024 need root")
    return f"start_udp_port/udp_host: cannot bind {where}: {exc.strerror or exc}"


def check_before_start(config: DetectorConfig) -> None:
    """Everything this host must offer before the readout of ``config`` starts."""
    check_udp_ports(config)
    check_shm(config)
