"""Process counters and their transport to the supervisor.

Every long-running process keeps plain integer counters (cheap to bump in a hot loop) and hands a
snapshot to a ``StatsReporter``, which PUSHes it as JSON to ``ipc.stats_address`` at most once per
interval. The supervisor PULLs them (``StatsCollector``), derives rates and writes the status file
that ``std-daq status`` shows. Sending never blocks: with no supervisor listening, snapshots are
dropped, so components run unchanged in tests.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import zmq

from daq_backend import ipc
from daq_backend.component import SERVICE_NAME_ENV, service_name

__all__ = ["SERVICE_NAME_ENV", "Counters", "StatsCollector", "StatsReporter", "service_name"]


@dataclass
class Counters:
    """Base for a component's counters: integer fields bumped in place, snapshot as a dict."""

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class StatsReporter:
    """PUSHes ``{"service", "pid", "time", "counters"}`` to the detector's stats address.

    ``tick()`` is for hot loops (rate limited, one ``time.monotonic`` call when not due);
    ``start()`` runs a background thread for components without a loop of their own."""

    def __init__(
        self,
        detector_name: str,
        service: str,
        source: Callable[[], dict[str, Any]],
        interval: float = 1.0,
        context: zmq.Context | None = None,
    ) -> None:
        self.service = service
        self.interval = interval
        self._source = source
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, 4)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(ipc.stats_address(detector_name))
        self._next = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def send(self) -> None:
        """Send one snapshot now (dropped if nobody collects)."""
        message = {
            "service": self.service,
            "pid": os.getpid(),
            "time": time.time(),
            "counters": self._source(),
        }
        with self._lock:
            if self._sock.closed:
                return
            try:
                self._sock.send(json.dumps(message).encode(), zmq.NOBLOCK)
            except zmq.Again:
                pass

    def tick(self) -> bool:
        """Send a snapshot if one is due; True if it did."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self.send()
            return True
        return False

    def due_in(self, now: float) -> float:
        """Seconds from ``now`` (monotonic) until the next snapshot is due (0: due already), so that a
        loop that sleeps long when idle can wake to report what changed since its last snapshot."""
        return max(0.0, self._next - now)

    def start(self) -> StatsReporter:
        self._thread = threading.Thread(target=self._loop, name=f"stats-{self.service}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.send()

    def close(self) -> None:
        """Send a final snapshot, then close (safe to call twice)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._sock.closed:
            self.send()
            with self._lock:
                self._sock.close()


#: Counters whose per-second rate the status shows.
RATE_COUNTERS = ("packets", "frames", "images", "bytes")


class StatsCollector:
    """Supervisor side: PULL-binds the stats address and keeps the latest snapshot per service,
    plus rates computed from the previous snapshot."""

    def __init__(self, detector_name: str, context: zmq.Context | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self.address = ipc.stats_address(detector_name)
        self.socket = self._ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.address)
        self.latest: dict[str, dict[str, Any]] = {}
        self.bad_messages = 0

    def drain(self) -> int:
        """Consume every queued snapshot without blocking; returns how many were read."""
        n = 0
        while True:
            try:
                raw = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return n
            n += 1
            self.ingest(raw)

    def ingest(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
            service = str(msg["service"])
            counters = dict(msg["counters"])
            stamp = float(msg["time"])
        except (ValueError, KeyError, TypeError):
            self.bad_messages += 1
            return
        previous = self.latest.get(service)
        rates: dict[str, float] = {}
        if previous is not None and previous.get("pid") == msg.get("pid"):
            dt = stamp - previous["time"]
            if dt > 0:
                for key in RATE_COUNTERS:
                    if key in counters and key in previous["counters"]:
                        rates[key] = (counters[key] - previous["counters"][key]) / dt
        self.latest[service] = {"pid": msg.get("pid"), "time": stamp, "counters": counters, "rates": rates}

    def close(self) -> None:
        self.socket.close()
        ipc.unlink_ipc(self.address)
