"""``EpicsBuffer``: the buffered EPICS PVs of a run, written by the DAQ's EPICS writer at its end.

The DAQ's EPICS buffer keeps every update of a list of PVs (and the pulse-id -> time map) in Redis.
This device remembers the pulse id when the run starts (``stage``) and, when it is triggered at the
end of the run, asks the EPICS writer (through the DAQ's REST API, ``POST /epics/write_async``) for
the file of the run's pulse-id range; the Status finishes when the file is written. Its reading
goes to its own stream of the run (default ``"epics_buffer"``): the pulse-id range and file name,
and per numeric PV one ``STREAM:`` data key (shape ``[n_points, ...]``) with a ``StreamResource``
pointing at ``/entry/<pv>/data`` in that file — so Tiled or any document consumer finds the values.

Use :func:`epics_buffer_wrapper` (or :class:`EpicsBufferSupplement` in ``RE.preprocessors``) to add
it to any plan; the current pulse id is read from ``pulse_id_pv`` over Channel Access (caproto).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.preprocessors import plan_mutator
from bluesky.utils import Msg
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.device import Staged
from ophyd.status import DeviceStatus

from daq_backend.messages import FINAL_STATES, RequestState
from std_daq_ophyd.client import DEFAULT_URL, StdDaqClient, StdDaqError
from std_daq_ophyd.documents import AssetDoc, Dataset, StreamDocuments
from std_daq_ophyd.writer import default_output_dir

log = logging.getLogger(__name__)

PulseIdSource = Callable[[], int]


class PulseIdPV:
    """The current pulse id, read from a PV over Channel Access (caproto's threading client)."""

    def __init__(self, pv_name: str, timeout: float = 5.0) -> None:
        self.pv_name = pv_name
        self.timeout = timeout
        self._context: Any = None
        self._pv: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> int:
        from caproto.threading.client import Context

        with self._lock:
            if self._pv is None:
                self._context = Context()
                (self._pv,) = self._context.get_pvs(self.pv_name, timeout=self.timeout)
            try:
                reading = self._pv.read(timeout=self.timeout)
            except (TimeoutError, OSError) as exc:
                raise ConnectionError(f"pulse-id PV {self.pv_name!r} cannot be read ({exc!r}); is its IOC up "
                                      "and EPICS_CA_ADDR_LIST right?") from None
        return int(reading.data[0])

    def close(self) -> None:
        with self._lock:
            if self._context is not None:
                self._context.disconnect()
            self._context = self._pv = None


def _group_name(channel: str) -> str:
    """Group of a PV in the EPICS writer's file (its escaping of ``/`` and ``%``)."""
    return channel.replace("%", "%25").replace("/", "%2F")


def _key_name(channel: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in channel).strip("_")


class EpicsBuffer(Device):
    """The EPICS PVs buffered by the DAQ during a run, referenced from the run's documents."""

    channels = Cpt(Signal, value="", kind="config", doc="PV names, comma separated")
    pulse_id_pv = Cpt(Signal, value="", kind="config")
    output_dir = Cpt(Signal, value="", kind="config", doc="folder of the files (on the DAQ host)")
    start_pulse_id = Cpt(Signal, value=0, kind="normal")
    stop_pulse_id = Cpt(Signal, value=0, kind="normal")
    file_name = Cpt(Signal, value="", kind="normal")

    def __init__(self, prefix: str = "", *, name: str, url: str = DEFAULT_URL, channels: Iterable[str] = (),
                 pulse_id_pv: str = "", output_dir: str | None = None,
                 pulse_id_source: PulseIdSource | None = None, timeout: float = 120.0,
                 token: str | None = None, **kwargs: Any) -> None:
        super().__init__(prefix, name=name, **kwargs)
        self.client = StdDaqClient(url, token=token)
        self.channels.put(",".join(channels))
        self.pulse_id_pv.put(pulse_id_pv)
        self.output_dir.put(output_dir or default_output_dir())
        self._source = pulse_id_source
        self.timeout = timeout
        self._composers: list[StreamDocuments] = []

    @property
    def channel_list(self) -> list[str]:
        return [c.strip() for c in str(self.channels.get()).split(",") if c.strip()]

    def _pulse_id(self) -> int:
        if self._source is None:
            pv = str(self.pulse_id_pv.get())
            if not pv:
                raise ValueError(f"{self.name}: pulse_id_pv is not set (or give pulse_id_source=)")
            self._source = PulseIdPV(pv)
        return self._source()

    def stage(self) -> list[object]:
        if not self.channel_list:
            raise ValueError(f"{self.name}: no channels configured")
        self.client.health()  # the DAQ must answer now, not at the end of the run
        self.start_pulse_id.put(self._pulse_id())
        self.stop_pulse_id.put(0)
        self.file_name.put("")
        self._composers = []
        return super().stage()

    def unstage(self) -> list[object]:
        self._composers = []
        return super().unstage()

    def trigger(self) -> DeviceStatus:
        """Write the PVs from the staged pulse id to now; done when the file is written."""
        if self._staged != Staged.yes:
            raise RuntimeError(f"{self.name}: stage before trigger")
        status = DeviceStatus(self, call_stop_on_failure=False)
        threading.Thread(target=self._write, args=(status,), name=f"{self.name}-write", daemon=True).start()
        return status

    def _write(self, status: DeviceStatus) -> None:
        try:
            stop = self._pulse_id()
            self.stop_pulse_id.put(stop)
            path = os.path.join(str(self.output_dir.get()),
                                f"{self.name}_{dt.datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:8]}.h5")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError:
                pass
            request = {"start_pulse_id": int(self.start_pulse_id.get()), "stop_pulse_id": stop,
                       "channels": self.channel_list, "output_file": path,
                       "metadata": {"ophyd_device": self.name}}
            request_id = self.client.epics_write_async(request)
            deadline = time.monotonic() + self.timeout
            while True:
                answer = self.client.request_status(request_id)
                if answer.state in FINAL_STATES:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: EPICS file not written within {self.timeout:g} s")
                time.sleep(0.1)
            if answer.state is not RequestState.COMPLETED:
                raise StdDaqError(f"{self.name}: the EPICS writer failed: {answer.message}")
            self._reference(path, answer.result or {})
        except Exception as exc:
            status.set_exception(exc)
        else:
            status.set_finished()

    def _reference(self, path: str, result: dict[str, Any]) -> None:
        """One STREAM: data key per numeric PV of the file (strings stay in the file only)."""
        self.file_name.put(str(result.get("output_file") or path))
        datasets = []
        for channel, info in (result.get("datasets") or {}).items():
            shape = [int(n) for n in info.get("shape", [])]
            dtype = str(info.get("dtype_numpy", ""))
            if not shape or shape[0] == 0 or dtype[1:2] not in ("f", "i", "u", "b"):
                continue
            key = f"{self.name}_{_key_name(channel)}"
            datasets.append(Dataset(key, str(info["dataset"]), tuple(shape[1:]), dtype, tuple(shape)))
        # one index = a PV's whole run; the rows differ per PV, hence one composer per PV
        composers = []
        for d in datasets:
            docs = StreamDocuments([d], d.chunk_shape[0], f"std-daq-epics:{self.client.url}")
            docs.open_file(str(self.file_name.get()))
            docs.add_indices(1)
            composers.append(docs)
        self._composers = composers

    def describe(self) -> dict[str, dict[str, Any]]:
        description = dict(super().describe())
        for docs in self._composers:
            description.update(docs.data_keys)
        return description

    def collect_asset_docs(self, index: int | None = None) -> Iterator[AssetDoc]:
        for docs in self._composers:
            yield from docs.collect()

    def get_index(self) -> int:
        return 1 if self._composers else 0


def epics_buffer_wrapper(plan: Iterable[Msg], buffers: Iterable[EpicsBuffer],
                         name: str = "epics_buffer") -> Generator[Msg, Any, Any]:
    """Stage ``buffers`` when the run opens and write + read them into stream ``name`` before it closes."""
    buffers = list(buffers)

    def after_open() -> Generator[Msg, Any, None]:
        for buffer in buffers:
            yield from bps.stage(buffer)

    def insert(msg: Msg) -> tuple[Generator[Msg, Any, Any] | None, Generator[Msg, Any, Any] | None]:
        if msg.command == "open_run":
            return None, after_open()
        if msg.command == "close_run":
            def before_close() -> Generator[Msg, Any, Any]:
                yield from bps.trigger_and_read(buffers, name=name)
                for buffer in buffers:
                    yield from bps.unstage(buffer)
                return (yield msg)

            return before_close(), None
        return None, None

    if not buffers:
        return (yield from plan)
    return (yield from plan_mutator(plan, insert))


class EpicsBufferSupplement:
    """``RE.preprocessors.append(EpicsBufferSupplement([epics]))``: every run gets the EPICS stream."""

    def __init__(self, buffers: Iterable[EpicsBuffer] = (), name: str = "epics_buffer") -> None:
        self.buffers = list(buffers)
        self.name = name

    def __call__(self, plan: Iterable[Msg]) -> Generator[Msg, Any, Any]:
        return epics_buffer_wrapper(plan, self.buffers, self.name)
