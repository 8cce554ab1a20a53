"""Batched, outage-tolerant appends to Redis streams (the EPICS buffer's output side).

Channel-access callbacks must never block on Redis, so they only append to an in-memory backlog;
one thread drains it in pipelined batches. When Redis is unreachable the error is logged once,
the thread retries with a capped backoff, and events keep accumulating in the backlog — bounded by
``backlog_maxlen``: beyond it the *oldest* events are dropped and counted (``n_dropped``), so memory
stays bounded and, once Redis is back, the most recent history is complete. Delivery is
at-least-once: a batch cut by a connection loss mid-pipeline is re-sent whole (PV entries may then
appear twice; repeated pulse ids are dropped).

Entry ids: PV streams use ``<ms>-*`` with ``ms`` clamped to the stream's newest millisecond so a stream
never goes backwards; the pulse-id stream uses ``<pulse id>-*`` and drops ids not above the newest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from daq_backend.epics.records import entry_ms
from daq_backend.epics.stats import BufferCounters
from daq_backend.epics.store import Store, xrevrange

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 2.0


def _fields(entry: Entry) -> dict[Any, Any]:
    """The entry's fields as redis' ``xadd`` types them (a dict invariant in its key type)."""
    return dict(entry.fields)


@dataclass(frozen=True)
class Entry:
    """One pending XADD. ``ms`` is the wanted id millisecond (the pulse id for the pulse stream)."""

    key: str
    ms: int
    fields: Mapping[str, bytes | str | int]
    maxlen: int
    strictly_increasing: bool = False

    @property
    def n_bytes(self) -> int:
        return sum(len(k) + len(v if isinstance(v, bytes) else str(v)) for k, v in self.fields.items())


class StreamSink:
    """Drains a bounded backlog of ``Entry`` into Redis from one thread."""

    def __init__(
        self,
        store: Store,
        counters: BufferCounters,
        *,
        backlog_maxlen: int = 1_000_000,
        batch_size: int = 1000,
        on_connect: Callable[[redis.Redis], None] | None = None,
    ) -> None:
        self.store = store
        self.counters = counters
        self.backlog_maxlen = backlog_maxlen
        self.batch_size = batch_size
        self._on_connect = on_connect
        self._queue: deque[Entry] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._drain_deadline = float("inf")
        self._last_ms: dict[str, int] = {}
        self._changed: set[str] = set()
        self._redis_ok = False
        self._in_outage = False
        self._needs_setup = True
        self._n_dropped_in_outage = 0
        self._thread = threading.Thread(target=self._run, name="epics-buffer-sink", daemon=True)

    @property
    def backlog(self) -> int:
        return len(self._queue)

    @property
    def redis_ok(self) -> bool:
        """True once a write succeeded and no later write failed."""
        return self._redis_ok

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Write what is queued (for at most ``drain_timeout`` s, then drop it), then end the thread."""
        with self._cond:
            self._drain_deadline = time.monotonic() + drain_timeout
            self._stop.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def put(self, entry: Entry) -> None:
        """Queue an entry; never blocks on Redis."""
        with self._cond:
            if len(self._queue) >= self.backlog_maxlen:
                self._queue.popleft()
                self._n_dropped_in_outage += 1
                self.counters.add(n_dropped=1)
            self._queue.append(entry)
            self._cond.notify()

    def take_changed(self) -> set[str]:
        """Keys written since the previous call (for the ``n_channels_changed`` statistic)."""
        with self._cond:
            changed, self._changed = self._changed, set()
        return changed

    def _next_batch(self) -> list[Entry] | None:
        with self._cond:
            while not self._queue and not self._stop.is_set():
                self._cond.wait(0.5)
            if not self._queue:
                return None
            return [self._queue.popleft() for _ in range(min(len(self._queue), self.batch_size))]

    def _run(self) -> None:
        batch: list[Entry] | None = None
        backoff = 0.1
        while True:
            if not batch:
                batch = self._next_batch()
                if batch is None:
                    return
            try:
                self._write(batch)
            except redis.RedisError as exc:
                self._on_failure(exc)
                if self._stop.is_set() and time.monotonic() >= self._drain_deadline:
                    lost = len(batch) + len(self._queue)
                    log.error(
                        "Stopping with Redis %s unreachable: %d buffered events lost", self.store.url, lost
                    )
                    self.counters.add(n_dropped=lost)
                    return
                if self._stop.is_set():
                    time.sleep(backoff)
                else:
                    self._stop.wait(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            batch = None
            backoff = 0.1
            if not self._redis_ok:
                self._on_recovery()

    def _on_failure(self, exc: redis.RedisError) -> None:
        self._needs_setup = True
        self._redis_ok = False
        if not self._in_outage:
            self._in_outage = True
            log.error(
                "Redis %s unreachable (%s: %s); keeping up to %d events in memory and retrying",
                self.store.url,
                type(exc).__name__,
                exc,
                self.backlog_maxlen,
            )

    def _on_recovery(self) -> None:
        if self._in_outage:
            log.warning(
                "Redis %s reachable again; backlog %d events, %d dropped during the outage",
                self.store.url,
                len(self._queue),
                self._n_dropped_in_outage,
            )
        else:
            log.info("Writing to Redis %s", self.store.url)
        self._in_outage = False
        self._n_dropped_in_outage = 0
        self._redis_ok = True

    def _top_ms(self, r: redis.Redis, key: str) -> int:
        newest = xrevrange(r, key, count=1)
        return entry_ms(newest[0][0]) if newest else -1

    def _write(self, batch: list[Entry]) -> None:
        r = self.store.redis
        if self._needs_setup:
            if self._on_connect is not None:
                self._on_connect(r)
            self._last_ms.clear()  # the server may have restarted: re-read stream tops
            self._needs_setup = False
        last = dict(self._last_ms)
        sent: list[Entry] = []
        pipe = r.pipeline(transaction=False)
        for entry in batch:
            if entry.key not in last:
                last[entry.key] = self._top_ms(r, entry.key)
            if entry.strictly_increasing and entry.ms <= last[entry.key]:
                self.counters.add(n_rejected=1)
                log.debug("Skipping %s id %d: not above the newest %d", entry.key, entry.ms, last[entry.key])
                continue
            ms = max(entry.ms, last[entry.key], 0)
            last[entry.key] = ms
            pipe.xadd(entry.key, _fields(entry), id=f"{ms}-*", maxlen=entry.maxlen, approximate=True)
            sent.append(entry)
        results = pipe.execute(raise_on_error=False) if sent else []
        n_events = n_bytes = 0
        for entry, result in zip(sent, results, strict=True):
            if isinstance(result, redis.ResponseError) and "equal or smaller" in str(result):
                if entry.strictly_increasing:
                    self.counters.add(n_rejected=1)
                    continue
                # Someone else moved the stream top: index the entry at the new top.
                top = self._top_ms(r, entry.key)
                r.xadd(entry.key, _fields(entry), id=f"{top}-*", maxlen=entry.maxlen, approximate=True)
                last[entry.key] = top
            elif isinstance(result, Exception):
                self.counters.add(n_rejected=1)
                log.warning("Redis refused an entry for %s: %s", entry.key, result)
                continue
            n_events += 1
            n_bytes += entry.n_bytes
        self._last_ms = last
        self.counters.add(n_events=n_events, n_bytes=n_bytes)
        with self._cond:
            self._changed.update(entry.key for entry in sent)
