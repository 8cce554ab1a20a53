"""EPICS writer: the buffered PV values of a pulse-id range -> one HDF5 file.

Request (JSON, validated by ``EpicsWriteRequest``)::

    {"start_pulse_id": int >= 0, "stop_pulse_id": int >= start, "channels": ["PV:A", ...],
     "output_file": "/absolute/path.h5", "metadata": {...}?, "overwrite": false?}

Procedure (the seed's, §6.6): ``start_pulse_id`` maps to the newest buffered pulse <= it and
``stop_pulse_id`` to the oldest buffered pulse >= it (waiting up to ``stop_wait_s`` for the buffer to
catch up); either may differ from the requested id by at most ``max_pulse_id_mismatch`` (1000 = 10 s at
100 Hz). The two pulses' EPICS timestamps bound the time range. For every channel the file gets the
last event at/before the start time, every event in between, and the first event at/after the stop
time (value updates and disconnects; connect events carry no value — the first update after a
reconnect shows it), in the order the buffer stored them. A kill is honoured between channels.

HDF5 layout::

    /                              NX_class="NXroot", default="entry", creator
    /entry                         NX_class="NXentry"; attributes: start_pulse_id, stop_pulse_id (requested),
                                   start_pulse_id_buffered, stop_pulse_id_buffered (the pulses used),
                                   start_time, stop_time (their EPICS timestamps, float64 s since the Unix
                                   epoch), request (the whole request as JSON), one attribute per
                                   ``metadata`` key (str/number/bool/list as is, anything else as JSON),
                                   incomplete (only when a kill or an error cut the write short)
    /entry/<pv name>               NX_class="NXlog", pv_name, dtype ("<f8", "<i4", "string", ...),
                                   n_points; note (why a dataset is empty)     ("/" in a name -> "%2F")
        data          (n, *shape)  the PV's dtype and element shape; strings as variable-length UTF-8;
                                   rows without a value (disconnects) hold NaN / 0 / ""
        data_shape    (n, ndim) u4 only when the element shape varied (rows padded to the largest shape)
        timestamp     (n,) f8      EPICS timestamp, s since the Unix epoch (units="s")
        timestamp_ns  (n,) i8      the same, exact integer ns
        pulse_id      (n,) u8      pulse id of the latest buffered pulse with time <= the row's time, else 0
        connected     (n,) u1      1 = value update, 0 = the channel disconnected at that time
        status        (n,) str     alarm status (NO_ALARM, HIHI, UDF, ...; "" for disconnects)
        severity      (n,) str     alarm severity (NO_ALARM, MINOR, MAJOR, INVALID; "" for disconnects)

Disconnect rows are timed by the buffer host's clock (channel access gives no EPICS time for them).
A channel that is configured in a buffer but never produced an event gets empty datasets (``data``
float64 of shape ``(0,)``) and a ``note`` attribute; a channel no buffer was configured with is an
error. Errors (``EpicsRequestError``, a ``ValueError``) start with the request field at fault.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from daq_backend.epics.records import (
    CHANNELS_KEY,
    PULSE_ID_STREAM,
    STRING_TYPE,
    Event,
    PvRecord,
    decode_record,
    entry_ms,
)
from daq_backend.epics.store import Store, xrange, xrevrange
from daq_backend.writer import roots
from daq_backend.writer.layout import replace_problem

NS = 1_000_000_000
#: the ``creator`` attribute of this writer's files (what ``overwrite`` recognises)
CREATOR = "daq_backend.epics.writer"
RESERVED_ENTRY_ATTRS = frozenset(
    {
        "NX_class",
        "start_pulse_id",
        "stop_pulse_id",
        "start_pulse_id_buffered",
        "stop_pulse_id_buffered",
        "start_time",
        "stop_time",
        "request",
        "incomplete",
    }
)


class EpicsRequestError(ValueError):
    """A request the writer cannot serve; the message starts with the field at fault."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class WriteKilled(RuntimeError):
    """The request was killed; the file keeps the channels written so far."""


class EpicsWriteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_pulse_id: StrictInt = Field(ge=0)
    stop_pulse_id: StrictInt = Field(ge=0)
    channels: list[str] = Field(min_length=1)
    output_file: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)
    overwrite: StrictBool = False

    @model_validator(mode="after")
    def _consistent(self) -> EpicsWriteRequest:
        if self.start_pulse_id > self.stop_pulse_id:
            raise ValueError(
                f"stop_pulse_id: {self.stop_pulse_id} is before start_pulse_id {self.start_pulse_id}"
            )
        blank = [c for c in self.channels if not c.strip()]
        duplicates = sorted({c for c in self.channels if self.channels.count(c) > 1})
        if blank or duplicates:
            raise ValueError(f"channels: {'empty channel name' if blank else f'duplicates {duplicates}'}")
        reserved = sorted(RESERVED_ENTRY_ATTRS & set(self.metadata))
        if reserved:
            raise ValueError(f"metadata: keys {reserved} are reserved for the writer's own attributes")
        check_output_file(self.output_file, self.overwrite)
        return self


def check_output_file(output_file: str, overwrite: bool) -> Path:
    """An absolute path inside the DAQ's output roots (``STD_DAQ_OUTPUT_ROOTS``, else the data root;
    see ``daq_backend.writer.roots``) in an existing, writable folder; an existing file only with
    ``overwrite``, and only a file this writer made (never a symlink, another file or another
    program's HDF5 file)."""
    path = Path(output_file)
    if not path.is_absolute():
        raise ValueError(f"output_file: {output_file!r} is not an absolute path")
    try:
        roots.check_path_text(output_file)
        path = roots.confine(os.path.normpath(output_file), roots.output_roots())
    except ValueError as exc:
        raise ValueError(f"output_file: {exc}") from None
    if overwrite and os.path.lexists(path):
        problem = replace_problem(str(path), None, overwrite, creator=CREATOR)
        if problem:
            raise ValueError(f"output_file: cannot replace {str(path)!r}: {problem}")
    if not path.parent.is_dir():
        raise ValueError(f"output_file: folder {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"output_file: folder {str(path.parent)!r} is not writable")
    if path.exists() and not overwrite:
        raise ValueError(f'output_file: {output_file!r} exists (set "overwrite": true to replace it)')
    if path.is_dir():
        raise ValueError(f"output_file: {output_file!r} is a directory")
    return path


def parse_request(body: dict[str, Any] | EpicsWriteRequest) -> EpicsWriteRequest:
    """Validate a request body; every problem is reported as one ``EpicsRequestError``."""
    if isinstance(body, EpicsWriteRequest):
        return body
    if not isinstance(body, dict):
        raise EpicsRequestError("request", f"expected a JSON object, got {type(body).__name__}")
    try:
        return EpicsWriteRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        if ": " in message and not loc:
            field, problem = message.split(": ", 1)
        else:
            field, problem = loc or "request", message
        others = len(exc.errors()) - 1
        raise EpicsRequestError(
            field, problem + (f" (and {others} more problems)" if others else "")
        ) from exc


@dataclass(frozen=True)
class WriterSettings:
    stream_prefix: str = ""
    max_pulse_id_mismatch: int = 1000
    stop_wait_s: float = 5.0  # how long to wait for the buffer to reach stop_pulse_id
    page_size: int = 1000


@dataclass(frozen=True)
class Pulse:
    pulse_id: int
    time_ns: int


def _pulse(entry: tuple[bytes, dict[bytes, bytes]]) -> Pulse:
    return Pulse(entry_ms(entry[0]), int(entry[1][b"timestamp"]))


def _order_ns(entry_id: bytes, record: PvRecord) -> int:
    """Ordering time of a PV entry: its timestamp, or its id's millisecond when that is later (clamped)."""
    return max(record.timestamp_ns, entry_ms(entry_id) * 1_000_000)


class PulseMap:
    """Pulse id <-> EPICS time over the ``pulse_id`` stream, for one request."""

    def __init__(self, store: Store, stream: str, settings: WriterSettings) -> None:
        self.r = store.redis
        self.stream = stream
        self.settings = settings

    def newest_at_or_before(self, pulse_id: int) -> Pulse | None:
        found = xrevrange(self.r, self.stream, max=str(pulse_id), min="-", count=1)
        return _pulse(found[0]) if found else None

    def oldest_at_or_after(self, pulse_id: int) -> Pulse | None:
        found = xrange(self.r, self.stream, min=str(pulse_id), max="+", count=1)
        return _pulse(found[0]) if found else None

    def oldest(self) -> Pulse | None:
        found = xrange(self.r, self.stream, count=1)
        return _pulse(found[0]) if found else None

    def newest(self) -> Pulse | None:
        found = xrevrange(self.r, self.stream, count=1)
        return _pulse(found[0]) if found else None

    def resolve(
        self, start_pulse_id: int, stop_pulse_id: int, killed: threading.Event | None = None
    ) -> tuple[Pulse, Pulse]:
        """The buffered pulses bounding the request (the seed's mapping, with clear errors). Waiting
        for the buffer to reach ``stop_pulse_id`` ends early on a kill."""
        limit = self.settings.max_pulse_id_mismatch
        oldest = self.oldest()
        if oldest is None:
            raise EpicsRequestError(
                "start_pulse_id", f"no pulse ids are buffered (stream {self.stream!r} is empty)"
            )
        start = self.newest_at_or_before(start_pulse_id)
        if start is None:
            raise EpicsRequestError(
                "start_pulse_id", f"{start_pulse_id} is before the oldest buffered pulse id {oldest.pulse_id}"
            )
        if start_pulse_id - start.pulse_id > limit:
            raise EpicsRequestError(
                "start_pulse_id",
                f"{start_pulse_id} is not buffered: the nearest earlier pulse id is {start.pulse_id}, "
                f"{start_pulse_id - start.pulse_id} away (max_pulse_id_mismatch {limit})",
            )
        deadline = time.monotonic() + self.settings.stop_wait_s
        stop = self.oldest_at_or_after(stop_pulse_id)
        while stop is None and time.monotonic() < deadline:
            if killed is not None and killed.wait(0.05):
                raise WriteKilled(f"killed while waiting for stop_pulse_id {stop_pulse_id} to be buffered")
            if killed is None:
                time.sleep(0.05)
            stop = self.oldest_at_or_after(stop_pulse_id)
        if stop is None:
            newest = self.newest()
            newest_id = newest.pulse_id if newest else None
            raise EpicsRequestError(
                "stop_pulse_id", f"{stop_pulse_id} is after the newest buffered pulse id {newest_id}"
            )
        if stop.pulse_id - stop_pulse_id > limit:
            raise EpicsRequestError(
                "stop_pulse_id",
                f"{stop_pulse_id} is not buffered: the nearest later pulse id is {stop.pulse_id}, "
                f"{stop.pulse_id - stop_pulse_id} away (max_pulse_id_mismatch {limit})",
            )
        return start, stop

    def timeline(self, start: Pulse, stop: Pulse) -> tuple[np.ndarray, np.ndarray]:
        """(pulse ids u8, times i8) of every buffered pulse from ``start`` to ``stop``."""
        pulses: list[int] = []
        times: list[int] = []
        cursor = str(start.pulse_id)
        while True:
            page = xrange(self.r, self.stream, min=cursor, max=str(stop.pulse_id), count=10_000)
            for entry in page:
                pulse = _pulse(entry)
                pulses.append(pulse.pulse_id)
                times.append(pulse.time_ns)
            if len(page) < 10_000:
                break
            cursor = "(" + page[-1][0].decode()
        return np.array(pulses, dtype=np.uint64), np.array(times, dtype=np.int64)

    def latest_at_or_before_time(self, time_ns: int) -> int:
        """Pulse id of the latest buffered pulse with time <= ``time_ns`` (0 if none), by bisection on
        the pulse-id-indexed stream (pulse times grow with pulse ids)."""
        oldest, newest = self.oldest(), self.newest()
        if oldest is None or newest is None or time_ns < oldest.time_ns:
            return 0
        if time_ns >= newest.time_ns:
            return newest.pulse_id
        low, upper = oldest, newest.pulse_id  # low.time <= t; every pulse >= upper has time > t
        while low.pulse_id + 1 < upper:
            middle = (low.pulse_id + 1 + upper) // 2
            found = xrange(self.r, self.stream, min=str(middle), max=str(upper - 1), count=1)
            if not found:
                upper = middle
                continue
            pulse = _pulse(found[0])
            if pulse.time_ns <= time_ns:
                low = pulse
            else:
                upper = pulse.pulse_id
        return low.pulse_id


class EpicsWriter:
    """Serves write requests from a store (see the module docstring); one request at a time."""

    def __init__(self, store: Store, settings: WriterSettings | None = None) -> None:
        self.store = store
        self.settings = settings or WriterSettings()
        self.pulses = PulseMap(store, self.settings.stream_prefix + PULSE_ID_STREAM, self.settings)

    def stream(self, channel: str) -> str:
        return self.settings.stream_prefix + channel

    def check_channels(self, channels: list[str]) -> set[str]:
        """Raise for channels no buffer knows; return those known but never seen (no stream)."""
        r = self.store.redis
        pipe = r.pipeline(transaction=False)
        for channel in channels:
            pipe.sismember(self.stream(CHANNELS_KEY), channel)
            pipe.type(self.stream(channel))
        answers = pipe.execute()
        unknown, wrong_type, never_seen = [], [], set()
        for i, channel in enumerate(channels):
            registered, kind = bool(answers[2 * i]), answers[2 * i + 1]
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind == "none":
                if registered:
                    never_seen.add(channel)
                else:
                    unknown.append(channel)
            elif kind != "stream":
                wrong_type.append(f"{channel} ({kind})")
        if unknown:
            raise EpicsRequestError("channels", f"unknown to the EPICS buffer (never configured): {unknown}")
        if wrong_type:
            raise EpicsRequestError("channels", f"Redis keys that are not EPICS buffer streams: {wrong_type}")
        return never_seen

    def select(self, channel: str, start_ns: int, stop_ns: int) -> list[PvRecord]:
        """Last event at/before ``start_ns``, all events between, first event at/after ``stop_ns``
        (connect events skipped: they carry no value)."""
        r, key, page = self.store.redis, self.stream(channel), self.settings.page_size
        before: tuple[bytes, PvRecord] | None = None
        cursor = str(start_ns // 1_000_000)
        while before is None:
            entries = xrevrange(r, key, max=cursor, min="-", count=16)
            for entry_id, fields in entries:
                record = decode_record(fields)
                if record.event is not Event.CONNECT and _order_ns(entry_id, record) <= start_ns:
                    before = (entry_id, record)
                    break
            if len(entries) < 16:
                break
            cursor = "(" + entries[-1][0].decode()
        selected = [before[1]] if before else []
        cursor = "(" + before[0].decode() if before else "-"
        while True:
            entries = xrange(r, key, min=cursor, max="+", count=page)
            for entry_id, fields in entries:
                record = decode_record(fields)
                if record.event is Event.CONNECT:
                    continue
                selected.append(record)
                if _order_ns(entry_id, record) >= stop_ns:
                    return selected
            if len(entries) < page:
                return selected
            cursor = "(" + entries[-1][0].decode()

    def write(
        self,
        request: EpicsWriteRequest | dict[str, Any],
        killed: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Write the file; returns a JSON-able summary. Raises ``EpicsRequestError`` for bad requests,
        ``WriteKilled`` when ``killed`` is set between channels."""
        request = parse_request(request)
        start, stop = self.pulses.resolve(request.start_pulse_id, request.stop_pulse_id, killed)
        never_seen = self.check_channels(request.channels)
        timeline = self.pulses.timeline(start, stop)
        path = check_output_file(request.output_file, request.overwrite)
        n_points: dict[str, int] = {}
        datasets: dict[str, dict[str, Any]] = {}
        try:
            h5 = h5py.File(path, "w" if request.overwrite else "w-")
        except OSError as exc:
            raise EpicsRequestError("output_file", f"cannot create {str(path)!r}: {exc}") from exc
        with h5:
            entry = _create_entry(h5, request, start, stop)
            for index, channel in enumerate(request.channels):
                if killed is not None and killed.is_set():
                    entry.attrs["incomplete"] = f"killed after {index} of {len(request.channels)} channels"
                    raise WriteKilled(
                        f"killed after writing {index} of {len(request.channels)} channels to {path}"
                    )
                try:
                    records = (
                        [] if channel in never_seen else self.select(channel, start.time_ns, stop.time_ns)
                    )
                    pulse_ids = self._pulse_ids([rec.timestamp_ns for rec in records], start, stop, timeline)
                    _write_channel(entry, channel, records, pulse_ids)
                except Exception as exc:
                    entry.attrs["incomplete"] = f"failed at channel {channel!r}: {exc}"
                    raise
                n_points[channel] = len(records)
                data = entry[_group_name(channel)]["data"]
                datasets[channel] = {
                    "dataset": data.name,
                    "dtype_numpy": STRING_TYPE if data.dtype.kind == "O" else data.dtype.str,
                    "shape": list(data.shape),
                }
                if progress is not None:
                    progress(index + 1, len(request.channels))
        return {
            "output_file": str(path),
            "start_pulse_id": request.start_pulse_id,
            "stop_pulse_id": request.stop_pulse_id,
            "start_pulse_id_buffered": start.pulse_id,
            "stop_pulse_id_buffered": stop.pulse_id,
            "n_points": n_points,
            "datasets": datasets,
        }

    def _pulse_ids(
        self, times: list[int], start: Pulse, stop: Pulse, timeline: tuple[np.ndarray, np.ndarray]
    ) -> np.ndarray:
        pulses, pulse_times = timeline
        result = np.zeros(len(times), dtype=np.uint64)
        cache: dict[int, int] = {}
        for i, t in enumerate(times):
            if start.time_ns <= t <= stop.time_ns and len(pulse_times):
                result[i] = pulses[np.searchsorted(pulse_times, t, side="right") - 1]
            else:
                if t not in cache:
                    cache[t] = self.pulses.latest_at_or_before_time(t)
                result[i] = cache[t]
        return result


def _attr_value(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)) and not (isinstance(value, int) and abs(value) >= 2**63):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return np.asarray(value)
    return json.dumps(value)


def _create_entry(h5: h5py.File, request: EpicsWriteRequest, start: Pulse, stop: Pulse) -> h5py.Group:
    h5.attrs["NX_class"] = "NXroot"
    h5.attrs["default"] = "entry"
    h5.attrs["creator"] = CREATOR
    entry = h5.create_group("entry")
    entry.attrs["NX_class"] = "NXentry"
    entry.attrs["start_pulse_id"] = np.uint64(request.start_pulse_id)
    entry.attrs["stop_pulse_id"] = np.uint64(request.stop_pulse_id)
    entry.attrs["start_pulse_id_buffered"] = np.uint64(start.pulse_id)
    entry.attrs["stop_pulse_id_buffered"] = np.uint64(stop.pulse_id)
    entry.attrs["start_time"] = start.time_ns / NS
    entry.attrs["stop_time"] = stop.time_ns / NS
    entry.attrs["request"] = request.model_dump_json()
    for key, value in request.metadata.items():
        entry.attrs[key] = _attr_value(value)
    return entry


def _group_name(channel: str) -> str:
    return channel.replace("%", "%25").replace("/", "%2F")


def _fill(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return math.nan
    if dtype.kind == "c":
        return complex(math.nan, math.nan)
    return 0


def _row_value(rec: PvRecord, as_text: bool) -> Any:
    if not as_text:
        return rec.value
    if rec.dtype == STRING_TYPE:
        return np.asarray(rec.value, dtype=object)
    return np.asarray(rec.value).astype(str).astype(object)  # numeric rows of a PV that became a string PV


def _values(records: list[PvRecord]) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(dtype label, data array (n, *shape), per-row shapes when they varied) for the rows."""
    updates = [rec for rec in records if rec.value is not None]
    if not updates:
        return "<f8", np.full((len(records),), math.nan), None
    ndim = max(len(rec.shape) for rec in updates)
    padded = [(1,) * (ndim - len(rec.shape)) + rec.shape for rec in updates]
    full_shape = tuple(max(shape[d] for shape in padded) for d in range(ndim))
    varied = len(set(padded)) > 1
    as_text = any(rec.dtype == STRING_TYPE for rec in updates)
    if as_text:
        dtype_label, dtype, fill = STRING_TYPE, np.dtype(object), ""
    else:
        dtype = np.result_type(*[np.dtype(rec.dtype) for rec in updates])
        dtype_label, fill = dtype.str, _fill(dtype)
    data = np.full((len(records), *full_shape), fill, dtype=dtype)
    row_shapes = np.zeros((len(records), ndim), dtype=np.uint32) if varied else None
    for i, rec in enumerate(records):
        if rec.value is None:
            continue
        array = np.asarray(_row_value(rec, as_text), dtype=dtype)
        array = array.reshape((1,) * (ndim - array.ndim) + array.shape)
        if array.ndim == 0:
            data[i] = array.item()  # (into an object array, a 0-d array would be stored as the object)
        else:
            index: tuple[int | slice, ...] = (i, *(slice(0, n) for n in array.shape))
            data[index] = array
        if row_shapes is not None:
            row_shapes[i] = array.shape
    return dtype_label, data, row_shapes


def _write_channel(entry: h5py.Group, channel: str, records: list[PvRecord], pulse_ids: np.ndarray) -> None:
    group = entry.create_group(_group_name(channel))
    group.attrs["NX_class"] = "NXlog"
    group.attrs["pv_name"] = channel
    group.attrs["n_points"] = len(records)
    text = h5py.string_dtype("utf-8")
    dtype_label, data, row_shapes = _values(records)
    group.attrs["dtype"] = dtype_label
    if not records:
        group.attrs["note"] = "no events buffered for this channel (never connected, or trimmed by MAXLEN)"
    group.create_dataset("data", data=data, dtype=text if dtype_label == STRING_TYPE else data.dtype)
    if row_shapes is not None:
        group.create_dataset("data_shape", data=row_shapes)
    times = np.array([rec.timestamp_ns for rec in records], dtype=np.int64)
    group.create_dataset("timestamp", data=times / NS, dtype=np.float64).attrs["units"] = "s"
    group.create_dataset("timestamp_ns", data=times).attrs["units"] = "ns"
    group.create_dataset("pulse_id", data=pulse_ids, dtype=np.uint64)
    group.create_dataset("connected", data=np.array([rec.connected for rec in records], dtype=np.uint8))
    group.create_dataset("status", data=np.array([rec.status for rec in records], dtype=object), dtype=text)
    group.create_dataset(
        "severity", data=np.array([rec.severity for rec in records], dtype=object), dtype=text
    )


def read_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """pv name -> {dataset name: array, plus "attrs": dict} of a writer file (for tests and devices)."""
    channels: dict[str, dict[str, Any]] = {}
    with h5py.File(path, "r") as h5:
        for group in h5["entry"].values():
            content: dict[str, Any] = {"attrs": dict(group.attrs)}
            for name, dataset in group.items():
                is_text = h5py.check_string_dtype(dataset.dtype) is not None
                content[name] = dataset.asstr()[()] if is_text else dataset[()]
            channels[str(group.attrs["pv_name"])] = content
    return channels
