"""Throughput statistics in InfluxDB line protocol.

The seed separated fields with spaces (``n_events=1i n_bytes=2i``), which InfluxDB rejects
(reference weakness 5); here fields are comma-separated and tag/field keys escaped, so every
line parses: ``epics_buffer,service_name=buf n_events=12i,n_bytes=3400i,throughput_bytes=340.0 <ns>``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


def _escape(text: str, specials: str) -> str:
    for char in "\\" + specials:
        text = text.replace(char, "\\" + char)
    return text


def _field_value(value: int | float | bool | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"line protocol cannot carry the float {value}")
        return repr(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_line(
    measurement: str,
    tags: Mapping[str, str],
    values: Mapping[str, int | float | bool | str],
    timestamp_ns: int,
) -> str:
    """One InfluxDB line: ``measurement,tag=v,... field=v,field=v timestamp``."""
    if not values:
        raise ValueError("line protocol needs at least one field")
    head = _escape(measurement, ", ")
    for key in sorted(tags):
        head += f",{_escape(key, ',= ')}={_escape(tags[key], ',= ')}"
    body = ",".join(f"{_escape(key, ',= ')}={_field_value(value)}" for key, value in values.items())
    return f"{head} {body} {timestamp_ns}"


@dataclass
class BufferCounters:
    """Cumulative counters of an EPICS buffer (thread-safe increments via ``add``)."""

    n_received: int = 0  # CA events seen (values, connects, disconnects, pulse ids)
    n_events: int = 0  # entries written to Redis
    n_bytes: int = 0  # field bytes written to Redis
    n_dropped: int = 0  # events lost because the in-memory backlog was full (Redis down)
    n_rejected: int = 0  # entries Redis refused or the buffer skipped (e.g. repeated pulse id)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
