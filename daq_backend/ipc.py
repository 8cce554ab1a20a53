"""Names of every shared-memory ring and ZMQ ipc endpoint of one detector, defined once.

Era B convention (reference §1.1): ``ipc:///tmp/std-daq-<detector_name>-<stream>``. The base
directory can be moved with ``STD_DAQ_IPC_DIR`` (tests, several instances on one host).
"""

from __future__ import annotations

import os


def ipc_dir() -> str:
    return os.environ.get("STD_DAQ_IPC_DIR", "/tmp")


def ipc_address(detector_name: str, stream: str) -> str:
    return f"ipc://{ipc_dir()}/std-daq-{detector_name}-{stream}"


def module_frames_address(detector_name: str) -> str:
    """Receivers PUSH ModuleFrame messages here; the synchroniser binds PULL."""
    return ipc_address(detector_name, "sync")


def image_metadata_address(detector_name: str) -> str:
    """The assembler (or stream-recv) binds PUB and sends 56-byte ImageMetadata per image."""
    return ipc_address(detector_name, "assembler")


def writer_agent_address(detector_name: str) -> str:
    """The writer agent binds PUSH with StoreStream JSON; the h5 writer connects PULL."""
    return ipc_address(detector_name, "writer_agent")


def writer_status_address(detector_name: str) -> str:
    """The h5 writer binds PUB with JSON progress of the file it writes."""
    return ipc_address(detector_name, "writer_status")


def stats_address(detector_name: str) -> str:
    """Every process PUSHes JSON counters here; the supervisor binds PULL."""
    return ipc_address(detector_name, "stats")


def frame_ring_name(detector_name: str, module_id: int) -> str:
    return f"std-daq-{detector_name}-frames-{module_id}"


def image_ring_name(detector_name: str) -> str:
    return f"std-daq-{detector_name}-image"
