"""Which processes make up one detector's DAQ, with which arguments: decided here, once.

A :class:`Topology` lists the processes of one detector as :class:`ServiceSpec` s (a command line plus
what the process owns in ``/dev/shm`` and as ipc socket files):

* ``receiver-<m>`` for every required module (UDP in, frame ring out);
* ``assembler`` (frame rings in, followed through their commit logs; image ring + ``ImageMetadata``
  out);
* ``writer-agent`` (write requests from the broker in, ``StoreStream`` out) and ``h5-writer``
  (``StoreStream`` in, HDF5 files out), two processes; with ``n_writers`` N > 1, N h5 writers
  ``h5-writer-0`` .. ``h5-writer-<N-1>`` (``writer_index`` of their spec), each with its
  own store stream and status socket, writing the part files of a master file;
* ``rest`` (the REST API; it also drives the detector control);
* optionally ``stream-send`` (buffer replication to another server) and ``live-stream`` (Array-1.0
  live stream for viewers).

``std-daq up``, the supervisor, the demo, the embedded DAQ used by the device tests and the benchmarks
all run what :meth:`Topology.services` lists (the in-process :class:`~daq_backend.embedded.ThreadedDaq`
builds the same roles as threads).

The data flows receiver -> assembler -> (writer agent, h5 writer, stream-send, live-stream), each
arrow a ring the upstream process creates and the downstream ones map. :func:`restart_set` says which
processes a config change must restart: those that read a changed field, and the readers of the image
ring when the assembler restarts (they keep the ring they mapped; the assembler itself follows a
re-created frame ring).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from daq_backend import ipc
from daq_backend.config import DetectorConfig


class Role(str, Enum):
    """What a process of the DAQ does (its place in the data flow)."""

    RECEIVER = "receiver"
    ASSEMBLER = "assembler"
    WRITER_AGENT = "writer-agent"
    H5_WRITER = "h5-writer"
    REST = "rest"
    STREAM_SEND = "stream-send"
    LIVE_STREAM = "live-stream"
    OTHER = "other"


#: roles that must restart with the given role: the readers of the image ring keep the ring they
#: mapped, so a re-created one (a restarted assembler) needs them restarted too; the assembler follows
#: a re-created frame ring by itself (a restarted receiver alone is enough), and a receiver writing
#: straight into the image ring (``readout.direct``) takes over a re-created image ring by itself
DOWNSTREAM: dict[Role, tuple[Role, ...]] = {
    Role.ASSEMBLER: (Role.WRITER_AGENT, Role.H5_WRITER, Role.STREAM_SEND, Role.LIVE_STREAM),
}

#: config fields read by one part of the pipeline only; every other field (geometry, bit depth,
#: detector type, ...) restarts the receivers and the assembler (and so, downstream, everything but
#: the REST API)
FIELD_READERS: dict[str, tuple[Role, ...]] = {
    "udp_host": (Role.RECEIVER,),
    "start_udp_port": (Role.RECEIVER,),
    "receiver_rt_priority": (Role.RECEIVER,),
    "frame_ring_slots": (Role.RECEIVER,),
    "image_id_source": (Role.RECEIVER,),
    "module_sync_timeout": (Role.ASSEMBLER,),
    "module_sync_queue_size": (Role.ASSEMBLER,),
    "pedestal_gain_file": (Role.ASSEMBLER,),
    "image_ring_slots": (Role.ASSEMBLER,),
    "writer_user_id": (Role.WRITER_AGENT, Role.H5_WRITER),
    "n_writers": (Role.WRITER_AGENT, Role.H5_WRITER),
}


@dataclass(frozen=True)
class ServiceSpec:
    """One supervised process: a command line (``argv``) or a picklable ``target`` run in a spawned
    interpreter. ``shm_names`` / ``ipc_addresses``: what this service owns and may leave behind if
    killed; the supervisor removes them after stopping it. ``reports_stats``: the process PUSHes
    counters to the supervisor once it is ready (its first report is how a restart is known to be
    live); a process that does not is taken as ready once it has run ``ready_after`` seconds."""

    name: str
    argv: tuple[str, ...] | None = None
    target: Callable[..., object] | None = None
    args: tuple[Any, ...] = ()
    restart: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    shm_names: tuple[str, ...] = ()
    ipc_addresses: tuple[str, ...] = ()
    role: Role = Role.OTHER
    module: int | None = None
    #: an h5 writer's index among several (``ipc.writer_indices``; None: the only one)
    writer_index: int | None = None
    reports_stats: bool = False
    ready_after: float = 1.0

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.target is None):
            raise ValueError(f"service {self.name!r}: give exactly one of argv and target")


@dataclass(frozen=True)
class Topology:
    """The processes of one detector (see the module docstring).

    ``config_path``: the detector JSON every process reads (the supervisor keeps it equal to the live
    config). ``broker_url``: where the writer agent and the REST API meet (``embedded://NAME`` or
    ``amqp://...``). ``readout_processes`` / ``writer``: run the receivers and assembler / the h5
    writer and writer agent (False: they run elsewhere). ``rest_port`` None leaves the REST API out;
    ``rest_args`` are more ``std-daq rest`` options. ``stream_send`` / ``live_stream``: the address to
    serve on (None: not run); ``live_stream_args``: more ``std-daq live-stream`` options (``--mode``,
    ``--param``). ``receiver_args``: more receiver options (``--rcvbuf``). ``output_roots``: the
    folders files may be written in, given as ``--output-root`` to every process that decides where a
    file goes (h5 writer, writer agent, REST API; empty: each uses ``STD_DAQ_OUTPUT_ROOTS``, else the
    default data root, see ``daq_backend.writer.roots``). ``log_level``: every
    process's. ``launcher``: a command line prefix every process runs under (it must ``exec`` the
    rest, so the PID stays the supervisor's child: e.g. a shell redirecting the output to a log)."""

    config: DetectorConfig
    config_path: Path
    broker_url: str
    readout_processes: bool = True
    writer: bool = True
    rest_port: int | None = None
    rest_host: str = "127.0.0.1"
    rest_args: tuple[str, ...] = ()
    stream_send: str | None = None
    live_stream: str | None = None
    live_stream_args: tuple[str, ...] = ()
    receiver_args: tuple[str, ...] = ()
    output_roots: tuple[str, ...] = ()
    log_level: str | None = None
    launcher: tuple[str, ...] = ()
    python: str = sys.executable

    @property
    def rest_url(self) -> str | None:
        """Where a client on this host reaches the REST API (None: not run)."""
        if self.rest_port is None:
            return None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.rest_host, self.rest_host)
        return f"http://[{host}]:{self.rest_port}" if ":" in host else f"http://{host}:{self.rest_port}"

    def _log(self) -> tuple[str, ...]:
        return ("--log-level", self.log_level.upper()) if self.log_level else ()

    def _roots(self) -> tuple[str, ...]:
        return tuple(f"--output-root={r}" for r in self.output_roots)

    def _cli(self, command: str, *args: str) -> tuple[str, ...]:
        return (*self.launcher, self.python, "-m", "daq_backend.cli", command, str(self.config_path), *args,
                *self._log())

    def readout(self) -> list[ServiceSpec]:
        """A receiver per required module plus the synchroniser/assembler."""
        det = self.config.detector_name
        path = str(self.config_path)
        specs = [
            ServiceSpec(
                f"receiver-{m}",
                argv=(*self.launcher, self.python, "-m", "daq_backend.readout.receiver", path, str(m),
                      *self.receiver_args, *self._log()),
                shm_names=(ipc.frame_ring_name(det, m),),
                role=Role.RECEIVER, module=m, reports_stats=True,
            )
            for m in self.config.required_modules
        ]
        specs.append(ServiceSpec(
            "assembler",
            argv=(*self.launcher, self.python, "-m", "daq_backend.readout.assembler", path, *self._log()),
            shm_names=(ipc.image_ring_name(det),),
            ipc_addresses=(ipc.image_metadata_address(det),),
            role=Role.ASSEMBLER, reports_stats=True,
        ))
        return specs

    def services(self) -> list[ServiceSpec]:
        """Every process of the detector, upstream first (the order they are started in)."""
        det = self.config.detector_name
        specs = self.readout() if self.readout_processes else []
        if self.writer:
            indices = ipc.writer_indices(self.config.n_writers)
            for index in indices:
                specs.append(ServiceSpec(
                    h5_writer_name(index),
                    argv=self._cli("h5-writer", *(() if index is None else ("--writer-index", str(index))),
                                   *self._roots()),
                    ipc_addresses=(ipc.writer_status_address(det, index),),
                    role=Role.H5_WRITER, writer_index=index, reports_stats=True,
                ))
            specs.append(ServiceSpec(
                "writer-agent",
                argv=self._cli("writer-agent", "--broker-url", self.broker_url, *self._roots()),
                ipc_addresses=tuple(ipc.writer_agent_address(det, index) for index in indices),
                role=Role.WRITER_AGENT, reports_stats=True,
            ))
        if self.stream_send:
            specs.append(ServiceSpec(
                "stream-send", argv=self._cli("stream-send", "--address", self.stream_send),
                role=Role.STREAM_SEND, reports_stats=True,
            ))
        if self.live_stream:
            specs.append(ServiceSpec(
                "live-stream",
                argv=self._cli("live-stream", "--address", self.live_stream, *self.live_stream_args),
                ipc_addresses=(self.live_stream,) if self.live_stream.startswith("ipc://") else (),
                role=Role.LIVE_STREAM, reports_stats=True,
            ))
        if self.rest_port is not None:
            specs.append(ServiceSpec(
                "rest",
                argv=self._cli("rest", "--rest-port", str(self.rest_port), "--host", self.rest_host,
                               "--broker-url", self.broker_url, *self._roots(), *self.rest_args),
                role=Role.REST,
            ))
        return specs

    def with_config(self, config: DetectorConfig) -> Topology:
        """The same topology for another config of the same detector."""
        return replace(self, config=config)


def h5_writer_name(index: int | None) -> str:
    """The process name of h5 writer ``index`` (see ``ipc.writer_indices``): ``h5-writer`` when it is
    the only one, else ``h5-writer-<k>``."""
    return "h5-writer" if index is None else f"h5-writer-{index}"


def readout_services(config: DetectorConfig, config_path: str | Path) -> list[ServiceSpec]:
    """The readout part of a detector's topology (receivers and assembler)."""
    return Topology(config, Path(config_path), broker_url="").readout()


def changed_fields(old: DetectorConfig, new: DetectorConfig) -> set[str]:
    """Names of the config fields whose values differ (extra, unknown fields included)."""
    a, b = old.to_json_dict(), new.to_json_dict()
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def restart_set(old: DetectorConfig, new: DetectorConfig,
                services: Iterable[ServiceSpec]) -> set[str]:
    """Names of the services that must restart for the change ``old`` -> ``new``: those reading a
    changed field and everything downstream of them. The REST API is never among them (it takes a new
    config in place)."""
    roles: set[Role] = set()
    for name in changed_fields(old, new):
        roles.update(FIELD_READERS.get(name, (Role.RECEIVER, Role.ASSEMBLER)))
    pending = list(roles)
    while pending:
        for down in DOWNSTREAM.get(pending.pop(), ()):
            if down not in roles:
                roles.add(down)
                pending.append(down)
    return {s.name for s in services if s.role in roles}
