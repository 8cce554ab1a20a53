"""Module synchronisation: which module frames make up one image, and when to stop waiting.

Pure bookkeeping (no I/O, time passed in) so every rule is unit-testable. Fixes the seed's weak
spots (reference §4.1-4.2, weaknesses 7 and 9): it never raises on drifting modules, a duplicate
module frame is counted and ignored instead of dropping the image, and an incomplete image waits
at most ``timeout`` seconds (not until ``queue_size`` newer ids happen to arrive).

Rules, for the lowest pending image id (images leave strictly in id order):

* every required module reported it -> ``COMPLETE``;
* each module still missing has since reported a *newer* id -> ``OVERTAKEN`` (receivers flush
  frames in order, so the missing frame is lost; this makes a lost module frame cost no latency);
* ``queue_size`` newer ids are pending -> ``QUEUE_FULL``;
* it has waited ``timeout`` seconds -> ``TIMEOUT``.

A frame for an image emitted less than ``late_window`` seconds (default: ``timeout``) ago is a
duplicate (its module was part of the image) or late (it was not) and is dropped; so is a second
frame of one module for a pending image.

Images leave in strictly increasing id within one numbering of the detector. Receivers announce a
module's frames in increasing id within one numbering (``readout.window``), so a module whose id goes
back (not forward) has restarted its numbering (a new acquisition, a reset frame counter): its frames
from then on belong to the next *epoch*, and images are ordered by (epoch, id). The first module to
go back opens a new epoch, the others join it when they go back too, so frames of the old numbering
still on their way are released before (and never mixed with) frames of the new one. A frame of the
current numbering whose image id is below an image already released is late (its image left).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from daq_backend.formats import ModuleFrame


class Release(str, Enum):
    """Why an image left the synchroniser."""

    COMPLETE = "complete"
    OVERTAKEN = "overtaken"
    QUEUE_FULL = "queue_full"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"


class Accepted(str, Enum):
    """What ``add`` did with a module frame."""

    NEW = "new"
    ADDED = "added"
    DUPLICATE = "duplicate"
    LATE = "late"
    NOT_REQUIRED = "not_required"


@dataclass
class SyncedImage:
    """An image id and the frames of the modules that reported it (missing modules absent)."""

    image_id: int
    frames: dict[int, ModuleFrame]
    release: Release
    first_seen: float

    @property
    def complete(self) -> bool:
        return self.release is Release.COMPLETE


#: (epoch, image id): the order images leave in
Key = tuple[int, int]


@dataclass
class _Pending:
    key: Key
    first_seen: float
    created_seq: int
    frames: dict[int, ModuleFrame] = field(default_factory=dict)

    @property
    def image_id(self) -> int:
        return self.key[1]


class Synchroniser:
    """Groups ``ModuleFrame``s by image id and releases images in id order (see module doc)."""

    #: Emitted ids remembered for duplicate/late detection (besides the time window).
    MAX_EMITTED = 100_000

    def __init__(
        self,
        required_modules: tuple[int, ...] | list[int],
        queue_size: int,
        timeout: float,
        late_window: float | None = None,
    ) -> None:
        if not required_modules:
            raise ValueError("required_modules: at least one module must be required")
        if queue_size < 1:
            raise ValueError(f"queue_size: must be >= 1, got {queue_size}")
        if timeout <= 0:
            raise ValueError(f"timeout: must be > 0 s, got {timeout}")
        self.required = frozenset(required_modules)
        self.n_required = len(self.required)
        self.queue_size = queue_size
        self.timeout = timeout
        self.late_window = timeout if late_window is None else late_window
        self._pending: dict[Key, _Pending] = {}
        self._heap: list[Key] = []
        self._seq = 0
        self._last_seq: dict[int, int] = {}
        self._last_key: dict[int, Key] = {}
        #: per module: the epoch of its numbering; the newest epoch any module is in
        self._epoch: dict[int, int] = {}
        self._newest_epoch = 0
        #: numberings restarted (new epochs opened)
        self.n_restarts = 0
        self._newest_emitted: Key | None = None
        #: emitted key -> (monotonic emit time, modules that were part of it)
        self._emitted: OrderedDict[Key, tuple[float, frozenset[int]]] = OrderedDict()

    # -- input -------------------------------------------------------------------------------
    def add(self, frame: ModuleFrame, now: float) -> Accepted:
        module = frame.module_id
        if module not in self.required:
            return Accepted.NOT_REQUIRED
        image_id = frame.id
        self._seq += 1
        key = (self._epoch.get(module, 0), image_id)
        pending = self._pending.get(key)
        if pending is not None and module in pending.frames:
            return Accepted.DUPLICATE
        last = self._last_key.get(module)
        if last is not None and image_id <= last[1]:
            key = (self._restart(module), image_id)
            pending = self._pending.get(key)
        if pending is None:
            emitted = self._emitted.get(key)
            if emitted is not None and now - emitted[0] <= self.late_window:
                return Accepted.DUPLICATE if module in emitted[1] else Accepted.LATE
            if self._newest_emitted is not None and key <= self._newest_emitted:
                return Accepted.LATE
            pending = _Pending(key, now, self._seq)
            self._pending[key] = pending
            heapq.heappush(self._heap, key)
            result = Accepted.NEW
        else:
            result = Accepted.ADDED
        pending.frames[module] = frame
        self._last_seq[module] = self._seq
        self._last_key[module] = key
        return result

    def _restart(self, module: int) -> int:
        """``module``'s numbering went back: it joins the newest epoch, or opens the next one if it
        is in the newest already."""
        epoch = self._epoch.get(module, 0)
        if epoch < self._newest_epoch:
            epoch = self._newest_epoch
        else:
            epoch = self._newest_epoch = self._newest_epoch + 1
            self.n_restarts += 1
        self._epoch[module] = epoch
        return epoch

    # -- output ------------------------------------------------------------------------------
    def pop_ready(self, now: float) -> list[SyncedImage]:
        """Every image that can leave now, lowest id first."""
        out: list[SyncedImage] = []
        while self._heap:
            pending = self._pending[self._heap[0]]
            release = self._release_of(pending, now)
            if release is None:
                break
            out.append(self._pop(release, now))
        return out

    def drain(self, now: float) -> list[SyncedImage]:
        """Release everything still pending (shutdown): nothing is silently dropped."""
        return [self._pop(Release.SHUTDOWN, now) for _ in range(len(self._heap))]

    def next_deadline(self) -> float | None:
        """When the lowest pending image times out (the caller should wake up then)."""
        if not self._heap:
            return None
        return self._pending[self._heap[0]].first_seen + self.timeout

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def _release_of(self, pending: _Pending, now: float) -> Release | None:
        if len(pending.frames) == self.n_required:
            return Release.COMPLETE
        if self._overtaken(pending):
            return Release.OVERTAKEN
        if len(self._pending) - 1 >= self.queue_size:
            return Release.QUEUE_FULL
        if now - pending.first_seen >= self.timeout:
            return Release.TIMEOUT
        return None

    def _overtaken(self, pending: _Pending) -> bool:
        for module in self.required:
            if module in pending.frames:
                continue
            if self._last_seq.get(module, 0) <= pending.created_seq:
                return False
            if self._last_key[module] <= pending.key:
                return False
        return True

    def _pop(self, release: Release, now: float) -> SyncedImage:
        key = heapq.heappop(self._heap)
        pending = self._pending.pop(key)
        self._newest_emitted = key
        self._emitted[key] = (now, frozenset(pending.frames))
        self._emitted.move_to_end(key)
        while self._emitted:
            oldest, (stamp, _) = next(iter(self._emitted.items()))
            if now - stamp <= self.late_window and len(self._emitted) <= self.MAX_EMITTED:
                break
            del self._emitted[oldest]
        return SyncedImage(pending.image_id, pending.frames, release, pending.first_seen)
