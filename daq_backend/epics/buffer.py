"""EPICS buffer: channel-access monitors of a list of PVs -> Redis streams, plus a pulse-id -> time map.

A caproto threading client subscribes (DBR_TIME) to every PV of ``pv_list`` and to ``pulse_id_pv``.
Each monitor update and each connect/disconnect of a listed PV becomes one entry of the stream named
after the PV; each new pulse id becomes one entry of the ``pulse_id`` stream (formats:
``daq_backend.epics.records``). Retention is ``XADD MAXLEN ~`` (defaults: 864,000 entries per PV —
a day at 10 Hz — and 8,640,000 pulse ids — a day at 100 Hz, as in the seed).

Redis outages do not stop monitoring: events wait in a bounded in-memory backlog (``backlog_maxlen``,
oldest dropped and counted beyond it) and are written once Redis answers again
(``daq_backend.epics.sink``). Every ``stats_interval_s`` one InfluxDB line goes to the logger
``daq_backend.epics.stats`` and, if configured, is appended to ``stats_file``:

``epics_buffer,service_name=<n> n_events=<n>i,n_bytes=<n>i,n_channels_changed=<n>i,
throughput_bytes=<f>,n_received=<n>i,n_dropped=<n>i,n_rejected=<n>i,backlog=<n>i,redis_connected=<b>
<ts_ns>`` (counts are per interval; ``backlog`` and ``redis_connected`` are current values).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from caproto import AlarmSeverity, AlarmStatus
from caproto.threading.client import PV, Context, Subscription
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from daq_backend.epics.records import (
    CHANNELS_KEY,
    PULSE_ID_STREAM,
    encode_pulse,
    encode_state,
    encode_update,
)
from daq_backend.epics.sink import Entry, StreamSink
from daq_backend.epics.stats import BufferCounters, format_line
from daq_backend.epics.store import Store, make_store

log = logging.getLogger(__name__)
stats_log = logging.getLogger("daq_backend.epics.stats")

EPICS_EPOCH_OFFSET_S = 631_152_000  # 1990-01-01 minus 1970-01-01
PV_MAXLEN = 3600 * 24 * 10  # one day at <= 10 updates/s
PULSE_ID_MAXLEN = 3600 * 24 * 100  # one day at 100 Hz


class BufferConfig(BaseModel):
    """The buffer's JSON config (the seed's two keys plus optional tuning)."""

    model_config = ConfigDict(extra="forbid")

    pulse_id_pv: str = Field(min_length=1)
    pv_list: list[str]
    maxlen: PositiveInt = PV_MAXLEN
    pulse_id_maxlen: PositiveInt = PULSE_ID_MAXLEN
    stream_prefix: str = ""
    stats_interval_s: PositiveFloat = 10.0
    backlog_maxlen: PositiveInt = 1_000_000

    @field_validator("pv_list")
    @classmethod
    def _names(cls, pv_list: list[str]) -> list[str]:
        blank = [name for name in pv_list if not name.strip()]
        if blank:
            raise ValueError("empty PV name")
        duplicates = sorted({name for name in pv_list if pv_list.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate PV names {duplicates}")
        return pv_list


def load_config(path: str | Path) -> BufferConfig:
    """Read and validate a config file; errors name the file and the offending field."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"EPICS buffer config {path}: {exc}") from exc
    try:
        return BufferConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"EPICS buffer config {path}: {problems}") from exc


def epics_time_ns(metadata: Any) -> int:
    """Exact Unix-epoch ns of a DBR_TIME header (no float rounding)."""
    seconds = int(metadata.secondsSinceEpoch) + EPICS_EPOCH_OFFSET_S
    return seconds * 1_000_000_000 + int(metadata.nanoSeconds)


class EpicsBuffer:
    """Monitors the configured PVs and appends every event to Redis; ``start()`` / ``stop()``."""

    def __init__(
        self,
        config: BufferConfig,
        store: Store,
        *,
        service_name: str = "epics_buffer",
        stats_file: str | Path | None = None,
        context: Context | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.service_name = service_name
        self.stats_file = Path(stats_file) if stats_file is not None else None
        self.counters = BufferCounters()
        self.sink = StreamSink(
            store, self.counters, backlog_maxlen=config.backlog_maxlen, on_connect=self._register_channels
        )
        self._context = context
        self._owns_context = context is None
        self._pv_set = set(config.pv_list)
        self._pvs: list[PV] = []
        self._subscriptions: list[Subscription] = []
        self._stop = threading.Event()
        self._stats_thread = threading.Thread(target=self._stats_loop, name="epics-buffer-stats", daemon=True)
        self._last_stats = (time.monotonic(), self.counters.snapshot())

    def stream(self, name: str) -> str:
        return self.config.stream_prefix + name

    @property
    def pulse_stream(self) -> str:
        return self.stream(PULSE_ID_STREAM)

    def start(self) -> None:
        self.sink.start()
        if self._context is None:
            self._context = Context()
        names = list(dict.fromkeys([self.config.pulse_id_pv, *self.config.pv_list]))
        self._pvs = self._context.get_pvs(*names, connection_state_callback=self._on_state, timeout=None)
        for pv in self._pvs:
            subscription = pv.subscribe(data_type="time")
            subscription.add_callback(self._on_update)
            self._subscriptions.append(subscription)
        self._stats_thread.start()
        log.info(
            "EPICS buffer %s monitoring %d PVs + pulse id %s into %s",
            self.service_name,
            len(self.config.pv_list),
            self.config.pulse_id_pv,
            self.store,
        )

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Unsubscribe, write what is queued (bounded by ``drain_timeout``), log final statistics."""
        self._stop.set()
        for subscription in self._subscriptions:
            subscription.clear()
        self._subscriptions.clear()
        if self._owns_context and self._context is not None:
            self._context.disconnect()
            self._context = None
        self.sink.stop(drain_timeout)
        if self._stats_thread.is_alive():
            self._stats_thread.join()
        self.emit_stats()

    def _register_channels(self, r: redis.Redis) -> None:
        if self.config.pv_list:
            r.sadd(self.stream(CHANNELS_KEY), *self.config.pv_list)

    def _on_state(self, pv: PV, state: str) -> None:
        if state not in ("connected", "disconnected") or self._stop.is_set():
            return  # our own shutdown is not the IOC disconnecting
        connected = state == "connected"
        self.counters.add(n_received=1)
        kind = "Pulse-id PV" if pv.name == self.config.pulse_id_pv else "PV"
        log.log(logging.DEBUG if connected else logging.WARNING, "%s %s %s", kind, pv.name, state)
        if pv.name in self._pv_set:
            now = time.time_ns()
            self.sink.put(
                Entry(
                    self.stream(pv.name), now // 1_000_000, encode_state(connected, now), self.config.maxlen
                )
            )

    def _on_update(self, subscription: Subscription, response: Any) -> None:
        pv = subscription.pv
        self.counters.add(n_received=1)
        try:
            timestamp_ns = epics_time_ns(response.metadata)
            if pv.name == self.config.pulse_id_pv:
                self._on_pulse(response, timestamp_ns)
            if pv.name in self._pv_set:
                channel = pv.channel
                scalar = (channel.native_data_count if channel is not None else response.data_count) == 1
                fields = encode_update(
                    response.data,
                    scalar=scalar,
                    timestamp_ns=timestamp_ns,
                    status=AlarmStatus(response.metadata.status).name,
                    severity=AlarmSeverity(response.metadata.severity).name,
                )
                self.sink.put(
                    Entry(self.stream(pv.name), timestamp_ns // 1_000_000, fields, self.config.maxlen)
                )
        except Exception:
            self.counters.add(n_rejected=1)
            log.exception("Cannot buffer an update of %s", pv.name)

    def _on_pulse(self, response: Any, timestamp_ns: int) -> None:
        value = float(response.data[0])
        if not math.isfinite(value) or value < 0:
            self.counters.add(n_rejected=1)
            log.warning("Pulse-id PV %s sent %r: not a pulse id", self.config.pulse_id_pv, value)
            return
        fields = encode_pulse(timestamp_ns, time.time_ns())
        self.sink.put(
            Entry(
                self.pulse_stream, round(value), fields, self.config.pulse_id_maxlen, strictly_increasing=True
            )
        )

    def stats_line(self) -> str:
        """The InfluxDB line for the counts since the previous call."""
        now = time.monotonic()
        current = self.counters.snapshot()
        previous_time, previous = self._last_stats
        self._last_stats = (now, current)
        delta = {name: current[name] - previous[name] for name in current}
        elapsed = max(now - previous_time, 1e-9)
        values: dict[str, int | float | bool] = {
            "n_events": delta["n_events"],
            "n_bytes": delta["n_bytes"],
            "n_channels_changed": len(self.sink.take_changed()),
            "throughput_bytes": delta["n_bytes"] / elapsed,
            "n_received": delta["n_received"],
            "n_dropped": delta["n_dropped"],
            "n_rejected": delta["n_rejected"],
            "backlog": self.sink.backlog,
            "redis_connected": self.sink.redis_ok,
        }
        return format_line("epics_buffer", {"service_name": self.service_name}, values, time.time_ns())

    def emit_stats(self) -> str:
        line = self.stats_line()
        stats_log.info(line)
        if self.stats_file is not None:
            try:
                with self.stats_file.open("a") as out:
                    out.write(line + "\n")
            except OSError as exc:
                log.error("Cannot append statistics to %s: %s", self.stats_file, exc)
        return line

    def _stats_loop(self) -> None:
        while not self._stop.wait(self.config.stats_interval_s):
            self.emit_stats()


def main(argv: Sequence[str] | None = None) -> int:
    """``std-daq epics-buffer CONFIG [--redis-url URL] [--service-name N] [--stats-file F]``; runs until
    SIGINT/SIGTERM. CA addressing comes from the usual ``EPICS_CA_*`` environment variables."""
    parser = argparse.ArgumentParser(prog="std-daq epics-buffer", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="JSON file: {pulse_id_pv, pv_list, maxlen?, pulse_id_maxlen?, ...}")
    parser.add_argument(
        "--redis-url",
        default=None,
        help="redis://host:port, 'embedded' (default: env REDIS_HOST, else embedded)",
    )
    parser.add_argument("--service-name", default=os.environ.get("SERVICE_NAME", "epics_buffer"))
    parser.add_argument("--stats-file", default=None, help="append statistics lines here (e.g. perf.log)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        store = make_store(args.redis_url)
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    buffer = EpicsBuffer(config, store, service_name=args.service_name, stats_file=args.stats_file)
    if store.embedded is not None:
        log.info("Embedded store: point the EPICS writer at --redis-url %s", store.url)
    buffer.start()
    try:
        stop.wait()
    finally:
        buffer.stop()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
