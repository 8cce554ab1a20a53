"""CPU time and RSS of named processes, sampled in a thread, read back for any time window.

Why: "CPU seconds per frame" must cover exactly the acquisition, not start-up imports or the idle
wait that ends a lossy run. Samples every ``interval`` seconds (``psutil``: user + system time of the
process and all its threads, RSS) let the caller ask for the CPU used between two instants
(interpolated between samples) and the RSS at start, end and its maximum. The machine-wide busy CPU
is sampled too, so the CPU used by *other* programs during a run (the noise on a shared machine) is
reported beside the figures.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

import psutil

#: Key of the machine-wide sample series (busy CPU seconds of all cores, no RSS).
MACHINE = "*machine*"


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


@dataclass
class Series:
    """Samples of one process: time (monotonic), cumulative CPU seconds, RSS bytes."""

    t: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def add(self, t: float, cpu: float, rss: int) -> None:
        self.t.append(t)
        self.cpu.append(cpu)
        self.rss.append(rss)

    def cpu_at(self, when: float) -> float:
        """Cumulative CPU at ``when``, linear between samples, clamped to the first/last sample."""
        if not self.t:
            return 0.0
        i = bisect.bisect_left(self.t, when)
        if i == 0:
            return self.cpu[0]
        if i >= len(self.t):
            return self.cpu[-1]
        t0, t1 = self.t[i - 1], self.t[i]
        c0, c1 = self.cpu[i - 1], self.cpu[i]
        return c0 if t1 <= t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)

    def window(self, start: float, end: float) -> list[int]:
        lo = bisect.bisect_left(self.t, start)
        hi = bisect.bisect_right(self.t, end)
        return self.rss[max(0, lo - 1): hi + 1]


@dataclass(frozen=True)
class Usage:
    """What one process used in a window."""

    cpu_s: float
    rss_start: int
    rss_end: int
    rss_max: int

    def to_dict(self) -> dict[str, float | int]:
        return {"cpu_s": round(self.cpu_s, 4), "rss_start": self.rss_start, "rss_end": self.rss_end,
                "rss_max": self.rss_max}


class ProcessMonitor:
    """Samples the processes given to :meth:`add` until :meth:`stop` (a daemon thread)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.series: dict[str, Series] = {MACHINE: Series()}
        self._procs: dict[str, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, pid: int) -> None:
        """Watch ``pid`` as ``name`` (a new pid under an old name starts a new series)."""
        proc = psutil.Process(pid)
        with self._lock:
            self._procs[name] = proc
            self.series[name] = Series()
        self.sample()

    def remove(self, name: str) -> None:
        with self._lock:
            self._procs.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return [n for n in self.series if n != MACHINE]

    def sample(self) -> float:
        """Take one sample of everything now; returns its time (use it to mark a window edge)."""
        with self._lock:
            now = time.monotonic()
            self.series[MACHINE].add(now, machine_busy_seconds(), 0)
            for name, proc in list(self._procs.items()):
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    del self._procs[name]  # ended: its last sample stands
                    continue
                self.series[name].add(now, times.user + times.system, rss)
            return now

    def start(self) -> ProcessMonitor:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="process-monitor", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def usage(self, name: str, start: float, end: float) -> Usage | None:
        """CPU used by ``name`` between ``start`` and ``end`` and its RSS then; None if never sampled."""
        with self._lock:
            s = self.series.get(name)
            if s is None or not s.t:
                return None
            rss = s.window(start, end) or [s.rss[-1]]
            return Usage(max(0.0, s.cpu_at(end) - s.cpu_at(start)), rss[0], rss[-1], max(rss))

    def machine_cpu(self, start: float, end: float) -> float:
        """Busy CPU seconds of the whole machine (all cores) between ``start`` and ``end``."""
        with self._lock:
            s = self.series[MACHINE]
            return max(0.0, s.cpu_at(end) - s.cpu_at(start))

    def __enter__(self) -> ProcessMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
