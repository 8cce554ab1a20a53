"""Names of every shared-memory ring and ZMQ ipc endpoint of one detector, defined once.

Era B convention (reference §1.1): ``ipc:///tmp/std-daq-<detector_name>-<stream>``. The base
directory can be moved with ``STD_DAQ_IPC_DIR`` and the ``/dev/shm`` names prefixed with
``STD_DAQ_SHM_PREFIX`` (tests, or a replica of a detector's buffer on the same host as the original).
"""

from __future__ import annotations

import os


def ipc_dir() -> str:
    return os.environ.get("STD_DAQ_IPC_DIR", "/tmp")


def shm_prefix() -> str:
    """Prefix of every ``/dev/shm`` name (default empty), so two instances of one detector coexist."""
    prefix = os.environ.get("STD_DAQ_SHM_PREFIX", "")
    if "/" in prefix:
        raise ValueError(f"STD_DAQ_SHM_PREFIX must not contain '/', got {prefix!r}")
    return prefix


def ipc_address(detector_name: str, stream: str) -> str:
    return f"ipc://{ipc_dir()}/std-daq-{detector_name}-{stream}"


def image_metadata_address(detector_name: str) -> str:
    """The assembler (or stream-recv) binds PUB and sends 56-byte ImageMetadata per image.

    Not the pipeline's hot path (receivers and assembler meet in the frame rings' commit logs, readers
    of images can follow the image ring's): the stream for ``stream.send``, ``stream.live``, the writer
    agent and external services that speak std-daq's protocol; the assembler publishes only while
    somebody subscribes."""
    return ipc_address(detector_name, "assembler")


def _writer_stream(stream: str, index: int | None) -> str:
    return stream if index is None else f"{stream}-{index}"


def writer_agent_address(detector_name: str, index: int | None = None) -> str:
    """The writer agent binds PUSH with StoreStream JSON; the h5 writer connects PULL. ``index``:
    h5 writer *k* of several (``n_writers`` > 1) has its own stream; None: the only one."""
    return ipc_address(detector_name, _writer_stream("writer_agent", index))


def writer_status_address(detector_name: str, index: int | None = None) -> str:
    """The h5 writer binds PUB with JSON progress of the file it writes (``index`` as above)."""
    return ipc_address(detector_name, _writer_stream("writer_status", index))


def writer_indices(n_writers: int) -> list[int | None]:
    """The ``index`` of each h5 writer of a detector with ``n_writers``: [None] for one writer (its
    addresses, journal and process name stay those of a single-writer DAQ), else 0..N-1."""
    return [None] if n_writers == 1 else list(range(n_writers))


def stats_address(detector_name: str) -> str:
    """Every process PUSHes JSON counters here; the supervisor binds PULL."""
    return ipc_address(detector_name, "stats")


def supervisor_address(detector_name: str) -> str:
    """The supervisor binds REP here: the REST API asks it to apply a new config (``reconfigure``)."""
    return ipc_address(detector_name, "supervisor")


def live_stream_address(detector_name: str) -> str:
    """Default bind of the Array-1.0 live stream (viewers on other hosts need a tcp:// address)."""
    return ipc_address(detector_name, "live")


def frame_ring_name(detector_name: str, module_id: int) -> str:
    return f"{shm_prefix()}std-daq-{detector_name}-frames-{module_id}"


def image_ring_name(detector_name: str) -> str:
    return f"{shm_prefix()}std-daq-{detector_name}-image"


def stream_recv_state_name(detector_name: str) -> str:
    """``/dev/shm`` segment where stream-recv keeps its position and counters across a crash."""
    return f"{shm_prefix()}std-daq-{detector_name}-stream-recv"


def status_file(detector_name: str) -> str:
    """JSON status (liveness + counters of every process) written by the supervisor."""
    return f"{ipc_dir()}/std-daq-{detector_name}-status.json"


def config_file(detector_name: str) -> str:
    """Where the supervisor writes the detector JSON its children read, if it was not given a file."""
    return f"{ipc_dir()}/std-daq-{detector_name}-config.json"


def unlink_ipc(address: str) -> None:
    """Remove the socket file of an ``ipc://`` endpoint this process bound (libzmq 4.3 leaves it)."""
    if address.startswith("ipc://"):
        try:
            os.unlink(address[len("ipc://") :])
        except FileNotFoundError:
            pass
