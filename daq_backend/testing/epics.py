"""A synthetic EPICS buffer with known contents, for tests of the EPICS writer and of what reaches it
(REST ``/epics/write_async``): ``fill_buffer`` writes pulse ids and channel updates into a store (real
Redis or the embedded one) through the buffer's own sink, and returns the events it wrote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from daq_backend.epics.records import CHANNELS_KEY, PULSE_ID_STREAM, encode_pulse, encode_state, encode_update
from daq_backend.epics.sink import Entry, StreamSink
from daq_backend.epics.stats import BufferCounters
from daq_backend.epics.store import Store
from daq_backend.epics.writer import EpicsWriter, WriterSettings

MS = 1_000_000
T0 = 1_700_000_000_000_000_000 + 123_456  # not on a millisecond boundary
FIRST_PULSE, LAST_PULSE = 1000, 1999  # contiguous, 10 ms apart
LATE_PULSES = range(3500, 3601)  # after a gap of 1500 pulse ids


def pulse_time(pulse: int) -> int:
    """The EPICS timestamp (ns) of pulse ``pulse`` in the buffer ``fill_buffer`` writes."""
    return T0 + (pulse - FIRST_PULSE) * 10 * MS


@dataclass
class Event:
    """One update of a channel as fed into the buffer."""

    time_ns: int
    value: Any  # None = disconnect


@dataclass
class Buffer:
    """A buffer written by ``fill_buffer``: its store, key prefix, pulse ids and events per channel."""

    store: Store
    prefix: str
    pulses: list[int]
    events: dict[str, list[Event]]

    @property
    def pulse_times(self) -> list[int]:
        """The EPICS timestamp (ns) of every buffered pulse id."""
        return [pulse_time(p) for p in self.pulses]

    def writer(self, **settings: Any) -> EpicsWriter:
        """An EPICS writer reading this buffer."""
        return EpicsWriter(self.store, WriterSettings(stream_prefix=self.prefix, **settings))


def _scalar(value: float) -> np.ndarray:
    return np.array([value], dtype=">f8")


def fill_buffer(store: Store, prefix: str) -> Buffer:
    """Write a known buffer into ``store`` under ``prefix``, through the buffer's own sink: pulse ids
    ``FIRST_PULSE``..``LAST_PULSE`` (10 ms apart) and ``LATE_PULSES`` after a gap, and the channels
    FLOAT (with a disconnect and an out-of-order resend), WAVE (2-D int16), TEXT, VAR (changing
    length), MIXED (number, then string) and NEVER (listed, never updated). Returns the events fed in,
    from which a test computes the rows an EPICS write request must give."""
    sink = StreamSink(store, BufferCounters())
    pulses = [*range(FIRST_PULSE, LAST_PULSE + 1), *LATE_PULSES]
    for pulse in pulses:
        entry = Entry(prefix + PULSE_ID_STREAM, pulse, encode_pulse(pulse_time(pulse), 0), 10**6, True)
        sink.put(entry)
    sink.put(Entry(prefix + PULSE_ID_STREAM, 1500, encode_pulse(0, 0), 10**6, True))  # repeated: dropped
    events: dict[str, list[Event]] = {
        "FLOAT": [],
        "WAVE": [],
        "TEXT": [],
        "NEVER": [],
        "VAR": [],
        "MIXED": [],
    }
    # FLOAT: an update exactly on every 7th pulse, one long before the rest, a disconnect + reconnect.
    events["FLOAT"].append(Event(pulse_time(FIRST_PULSE) + 2 * MS, 1.5))
    for pulse in range(1400, 1800, 7):
        events["FLOAT"].append(Event(pulse_time(pulse), pulse / 7))
    events["FLOAT"].insert(30, Event(events["FLOAT"][29].time_ns + 1 * MS, None))
    events["FLOAT"].append(Event(pulse_time(3550) + 5 * MS, -1.0))
    # WAVE: int16 (2, 3) arrays between pulses (3 ms after them), every 20 pulses.
    for pulse in range(1010, 2000, 20):
        events["WAVE"].append(
            Event(pulse_time(pulse) + 3 * MS, np.arange(6, dtype=">i2").reshape(2, 3) + pulse)
        )
    # TEXT: strings every 100 pulses.
    for pulse in range(1000, 2000, 100):
        events["TEXT"].append(Event(pulse_time(pulse) + 1, f"text \u00e9 {pulse}"))
    # VAR: a waveform whose length changes; MIXED: a PV that turns from a number into a string.
    events["VAR"] += [
        Event(pulse_time(1100), np.arange(3, dtype=">i4")),
        Event(pulse_time(1150), np.arange(5, dtype=">i4")),
    ]
    events["MIXED"] += [Event(pulse_time(1100), 2.5), Event(pulse_time(1150), "now text")]
    for name, series in events.items():
        for event in series:
            if event.value is None:
                fields = encode_state(False, event.time_ns)
            elif isinstance(event.value, str):
                fields = encode_update(
                    [event.value.encode()],
                    scalar=True,
                    timestamp_ns=event.time_ns,
                    status="NO_ALARM",
                    severity="NO_ALARM",
                )
            else:
                value = event.value if isinstance(event.value, np.ndarray) else _scalar(event.value)
                fields = encode_update(
                    value.ravel(),
                    scalar=value.size == 1,
                    timestamp_ns=event.time_ns,
                    status="HIHI" if name == "FLOAT" else "NO_ALARM",
                    severity="MAJOR",
                )
                if value.ndim == 2:  # a 2-D shape is not something CA delivers, but the format carries it
                    fields["shape"] = ",".join(map(str, value.shape))
            sink.put(Entry(prefix + name, event.time_ns // MS, fields, 10**6))
            if event.value is None:  # the reconnect that follows a disconnect
                sink.put(Entry(prefix + name, event.time_ns // MS, encode_state(True, event.time_ns), 10**6))
    # An old value re-sent out of order: keeps its timestamp, indexed at the stream's newest millisecond.
    late = Event(pulse_time(1200), 99.0)
    sink.put(
        Entry(
            prefix + "FLOAT",
            late.time_ns // MS,
            encode_update(
                _scalar(99.0), scalar=True, timestamp_ns=late.time_ns, status="NO_ALARM", severity="NO_ALARM"
            ),
            10**6,
        )
    )
    sink.start()
    sink.stop(drain_timeout=60)
    store.redis.sadd(prefix + CHANNELS_KEY, *events)
    return Buffer(store, prefix, pulses, events)
