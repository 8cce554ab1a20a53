"""The EPICS buffer's Redis stream format, defined once: the buffer writes it, the writer reads it.

PV streams — one stream per PV, named ``<stream_prefix><pv name>`` (the prefix is empty by default,
so the name is exactly the PV's, as in the seed). Every entry is one event:

=============  =====================================================================================
field          content
=============  =====================================================================================
``event``      ``update`` (a monitor value), ``connect`` or ``disconnect`` (channel state changes)
``ts``         time in integer ns since the Unix epoch: the EPICS timestamp of an update (exact,
               from ``secondsSinceEpoch``/``nanoSeconds``); the buffer host's clock for connect and
               disconnect events (channel-access state changes carry no EPICS time)
``connected``  ``1`` or ``0``
``type``       numpy dtype string, little endian (``<f8``, ``<i4``, ``<i2``, ``<f4``, ``|u1``,
               ``|i1``, ``<u2`` for enums...) or ``string``; empty when there is no value
``shape``      comma-separated dimensions: empty for a scalar, ``100`` for a 100-element waveform
``value``      numeric: the raw little-endian bytes (C order); ``string``: UTF-8 text for a scalar,
               a JSON list of texts for a string array; empty when there is no value
``status``     alarm status name (``NO_ALARM``, ``HIHI``, ``UDF``...), empty for state changes
``severity``   alarm severity name (``NO_ALARM``, ``MINOR``, ``MAJOR``, ``INVALID``)
=============  =====================================================================================

Entry ids are ``<ms>-<seq>`` with ``ms`` = the event time in ms, clamped so it never goes backwards
(an IOC clock step or an old value re-sent on reconnect keeps its true ``ts`` but is indexed at the
stream's newest millisecond); Redis assigns ``seq`` (``XADD <ms>-*``). The writer therefore finds a
time range with ``XRANGE``/``XREVRANGE`` on ids and resolves the boundary millisecond with ``ts``.

Pulse-id stream — ``<stream_prefix>pulse_id``: entry id ``<pulse id>-<seq>`` (``XADD <pulse id>-*``;
seq is 0 except for pulse id 0, which Redis stores as ``0-1``), fields ``timestamp`` = EPICS
timestamp of the pulse-id PV update in integer ns since the Unix epoch, and ``received`` = buffer
host time of reception (ns). Only increasing pulse ids are stored (a re-sent or repeated id is
dropped), so ``XREVRANGE pulse_id <p> - COUNT 1`` is the newest pulse <= p.

Channel registry — set ``<stream_prefix>epics_buffer:channels``: every PV any buffer was configured
with; the writer tells an unknown channel (error) from one that never produced an event (empty
dataset with a note).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

PULSE_ID_STREAM = "pulse_id"
CHANNELS_KEY = "epics_buffer:channels"
STRING_TYPE = "string"

Value = np.ndarray | str | list[str] | None


class Event(str, Enum):
    UPDATE = "update"
    CONNECT = "connect"
    DISCONNECT = "disconnect"


@dataclass(frozen=True)
class PvRecord:
    """One decoded PV stream entry. ``value`` is an ndarray of ``shape`` (0-d for scalars), a str, a
    list of str, or None for connect/disconnect events."""

    event: Event
    timestamp_ns: int
    connected: bool
    dtype: str
    shape: tuple[int, ...]
    value: Value
    status: str = ""
    severity: str = ""


def _decode_text(raw: bytes) -> str:
    """EPICS strings are bytes of unspecified encoding: UTF-8 if it decodes, else Latin-1 (never fails)."""
    raw = raw.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def normalize_value(data: Any, scalar: bool) -> tuple[str, tuple[int, ...], np.ndarray | str | list[str]]:
    """Channel-access data (numpy array, or list of bytes/str for strings) -> (type, shape, value).

    ``scalar`` is whether the channel's native element count is 1: CA has no other notion of a scalar.
    """
    if isinstance(data, np.ndarray) and data.dtype.kind != "S":
        array = data.astype(data.dtype.newbyteorder("<"), copy=False)
        if scalar and array.size == 1:
            array = array.reshape(())
        return array.dtype.str, array.shape, array
    texts = [item if isinstance(item, str) else _decode_text(bytes(item)) for item in data]
    if scalar and len(texts) == 1:
        return STRING_TYPE, (), texts[0]
    return STRING_TYPE, (len(texts),), texts


def encode_update(
    data: Any, *, scalar: bool, timestamp_ns: int, status: str, severity: str
) -> dict[str, bytes | str | int]:
    """Fields of an ``update`` entry for a monitor value."""
    dtype, shape, value = normalize_value(data, scalar)
    if dtype == STRING_TYPE:
        payload: bytes = (value if isinstance(value, str) else json.dumps(value)).encode("utf-8")
    else:
        payload = np.ascontiguousarray(value).tobytes()
    return {
        "event": Event.UPDATE.value,
        "ts": timestamp_ns,
        "connected": 1,
        "type": dtype,
        "shape": ",".join(str(d) for d in shape),
        "value": payload,
        "status": status,
        "severity": severity,
    }


def encode_state(connected: bool, timestamp_ns: int) -> dict[str, bytes | str | int]:
    """Fields of a ``connect`` / ``disconnect`` entry."""
    return {
        "event": (Event.CONNECT if connected else Event.DISCONNECT).value,
        "ts": timestamp_ns,
        "connected": int(connected),
        "type": "",
        "shape": "",
        "value": b"",
        "status": "",
        "severity": "",
    }


def _text(fields: dict[bytes, bytes], name: bytes) -> str:
    return fields.get(name, b"").decode()


def decode_record(fields: dict[bytes, bytes]) -> PvRecord:
    """Inverse of ``encode_update`` / ``encode_state``."""
    event = Event(_text(fields, b"event"))
    dtype = _text(fields, b"type")
    shape_text = _text(fields, b"shape")
    shape = tuple(int(d) for d in shape_text.split(",")) if shape_text else ()
    raw = fields.get(b"value", b"")
    value: Value
    if event is not Event.UPDATE or not dtype:
        value = None
    elif dtype == STRING_TYPE:
        value = raw.decode("utf-8") if not shape else list(json.loads(raw))
    else:
        value = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
    return PvRecord(
        event=event,
        timestamp_ns=int(fields[b"ts"]),
        connected=fields.get(b"connected", b"0") == b"1",
        dtype=dtype,
        shape=shape,
        value=value,
        status=_text(fields, b"status"),
        severity=_text(fields, b"severity"),
    )


def encode_pulse(timestamp_ns: int, received_ns: int) -> dict[str, int]:
    return {"timestamp": timestamp_ns, "received": received_ns}


def entry_ms(entry_id: bytes | str) -> int:
    """The millisecond (PV streams) or pulse id (pulse-id stream) part of a stream entry id."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def stream_name(prefix: str, name: str) -> str:
    return prefix + name
