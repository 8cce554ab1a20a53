"""Which packets belong to a module's stream, and when a new numbering may take over.

Pure bookkeeping (no I/O, time passed in) so every rule is unit-testable; the receiver keeps the
staged payloads, this decides what happens to them.

The *stream* is what a receiver writes into its frame ring: the header module id it comes from, for
a Jungfrau with ``image_id_source: auto`` whether its image ids are pulse ids or frame numbers, and
its newest frame (image id, frame number). A packet that opens a new frame belongs to the stream when
its numbering moves forward by at most ``ahead``::

    newest_id < image_id <= newest_id + ahead  and  newest_frame <= frame_number <= newest_frame + ahead

(frames skipped in between are lost frames: a gap, counted by the receiver). Every other packet of a
well-formed header (a frame number far ahead, a number behind the newest frame that is no straggler
of a recent one, another module id once the stream is idle, the other id source) is staged as a
*candidate* frame: kept aside, never placed in the ring. Candidates become the stream's new
numbering (a restarted frame counter, a new acquisition, a jump beyond ``ahead``) when the stream has
opened no frame since they began and either

* ``confirm_frames`` candidate frames with consecutive frame numbers, increasing image ids and one
  module id are complete, or
* the stream has been silent for ``restart_idle`` seconds and a candidate frame holds at least half
  of its packets (then every such frame before it of the same numbering comes along, in order).

A receiver without a stream is silent: its first frame with half of its packets starts one. While
the stream keeps opening frames nothing else is adopted: one port carries one module's one numbering
at a time, so a second numbering interleaved with it is not the detector. Random or absurd packets
never make half a frame, let alone ``confirm_frames`` consecutive complete ones; a candidate that is
not adopted is discarded (when the stream opens a frame, when it is evicted for a newer one, or
``expire_after`` seconds after its last packet) and its packets are counted as rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: A forward jump of the numbering larger than this is a new numbering, not lost frames.
MAX_FRAME_GAP = 1_000_000
#: Consecutive complete frames that confirm a new numbering while the old one is silent.
CONFIRM_FRAMES = 3
#: Seconds of silence of the stream after which a half-complete frame of a new numbering is enough.
RESTART_IDLE = 1.0


@dataclass(slots=True)
class CandidateFrame:
    """A staged frame: its identity, where the receiver keeps its payloads, and how full it is.

    ``pulse_mode``: the packet's image id is a pulse id (True), a frame number (False), or the
    detector has only one kind (None). ``pulse_id``/``daq_rec``: header fields of its first packet,
    for the module frame the receiver announces if it is adopted."""

    slot: int
    image_id: int
    frame_number: int
    module_id: int
    pulse_mode: bool | None
    began: float
    updated: float
    pulse_id: int = 0
    daq_rec: int = 0
    n_packets: int = 0


class StreamWindow:
    """One module's stream and its candidate frames (see the module docstring for the rules).

    ``module_id``: the header module id configured for the port (pinned: packets of any other id are
    rejected outright); None: learned from the first stream and followed by later ones.
    ``pulse_mode``: fixed id source (None: learned with the stream, for ``image_id_source: auto``).
    ``n_slots``: candidate frames kept at once (the receiver holds that many staging buffers)."""

    def __init__(
        self,
        packets_per_frame: int,
        *,
        module_id: int | None = None,
        ahead: int = MAX_FRAME_GAP,
        confirm_frames: int = CONFIRM_FRAMES,
        restart_idle: float = RESTART_IDLE,
        expire_after: float | None = None,
        n_slots: int | None = None,
    ) -> None:
        if packets_per_frame < 1:
            raise ValueError(f"packets_per_frame: must be >= 1, got {packets_per_frame}")
        if confirm_frames < 1:
            raise ValueError(f"confirm_frames: must be >= 1, got {confirm_frames}")
        if ahead < 1:
            raise ValueError(f"ahead: must be >= 1, got {ahead}")
        if restart_idle <= 0:
            raise ValueError(f"restart_idle: must be > 0 s, got {restart_idle}")
        self.packets_per_frame = packets_per_frame
        self.ahead = ahead
        self.confirm_frames = confirm_frames
        self.restart_idle = restart_idle
        self.expire_after = 2 * restart_idle if expire_after is None else expire_after
        self.n_slots = confirm_frames + 3 if n_slots is None else n_slots
        if self.n_slots < confirm_frames + 1:
            raise ValueError(f"n_slots: at least confirm_frames + 1 = {confirm_frames + 1}, "
                             f"got {self.n_slots}")
        #: header module id of the stream (None until a stream is learned)
        self.module_id = module_id
        self.pinned = module_id is not None
        #: whether the stream's image ids are pulse ids (None: the detector has one kind only)
        self.pulse_mode: bool | None = None
        #: newest frame of the stream (None: no stream yet)
        self.image_id: int | None = None
        self.frame_number: int | None = None
        #: monotonic time of the stream's last packet
        self.last_active = -math.inf
        self._candidates: dict[tuple[int, int, int], CandidateFrame] = {}
        self._free = list(range(self.n_slots - 1, -1, -1))

    # -- the stream --------------------------------------------------------------------------
    @property
    def has_stream(self) -> bool:
        return self.image_id is not None

    def idle(self, now: float) -> bool:
        """The stream has been silent for ``restart_idle`` seconds (or there is none)."""
        return now - self.last_active >= self.restart_idle

    def touch(self, now: float) -> None:
        """Packets of the stream arrived (continuing its open frame)."""
        if now > self.last_active:
            self.last_active = now

    def rejects_module(self, module_id: int, now: float) -> bool:
        """A packet of this header module id is rejected at once: the id is pinned to another one,
        or the stream comes from another one and is not idle (an idle stream may be followed by a
        new module's: that packet is staged)."""
        if module_id == self.module_id:
            return False
        return self.pinned or (self.has_stream and not self.idle(now))

    def in_window(self, image_id: int, frame_number: int, pulse_mode: bool | None = None) -> bool:
        """A new frame with these numbers continues the stream."""
        newest = self.image_id
        if newest is None or self.frame_number is None:
            return False
        if pulse_mode is not None and self.pulse_mode is not None and pulse_mode is not self.pulse_mode:
            return False
        return (newest < image_id <= newest + self.ahead
                and self.frame_number <= frame_number <= self.frame_number + self.ahead)

    def opened(self, image_id: int, frame_number: int, now: float) -> list[CandidateFrame]:
        """The stream opened a frame: the window moves, and every candidate is discarded (they began
        while the stream was still sending). Returns them, for the receiver to count."""
        self.image_id, self.frame_number = image_id, frame_number
        self.touch(now)
        return self.discard_all()

    # -- candidates --------------------------------------------------------------------------
    @property
    def candidates(self) -> list[CandidateFrame]:
        return list(self._candidates.values())

    def stage(
        self, image_id: int, frame_number: int, module_id: int, pulse_mode: bool | None, now: float
    ) -> tuple[CandidateFrame, bool, list[CandidateFrame]]:
        """The candidate frame a packet with these numbers goes to: (frame, is it new, frames
        evicted to make room). The caller places the packet in the frame's slot, then calls
        :meth:`received`."""
        key = (image_id, frame_number, module_id)
        frame = self._candidates.get(key)
        if frame is not None:
            return frame, False, []
        evicted = [] if self._free else [self._evict()]
        frame = CandidateFrame(self._free.pop(), image_id, frame_number, module_id, pulse_mode, now, now)
        self._candidates[key] = frame
        return frame, True, evicted

    def received(self, frame: CandidateFrame, now: float) -> list[CandidateFrame] | None:
        """One more packet of ``frame`` was staged; the frames to adopt now (oldest first), if any."""
        frame.n_packets += 1
        frame.updated = now
        ppf = self.packets_per_frame
        if frame.n_packets == ppf:
            run = self._consecutive_complete(frame)
            if run is not None:
                return run
        if 2 * frame.n_packets >= ppf and self.idle(now):
            return self._chain(frame)
        return None

    def check(self, now: float) -> tuple[list[CandidateFrame] | None, list[CandidateFrame]]:
        """Periodic step while candidates wait: (frames to adopt now, frames expired)."""
        expired = [c for c in self._candidates.values() if now - c.updated > self.expire_after]
        for c in expired:
            self._release(c)
        if self.idle(now):
            plausible = [c for c in self._candidates.values() if 2 * c.n_packets >= self.packets_per_frame]
            if plausible:
                return self._chain(max(plausible, key=lambda c: (c.updated, c.frame_number))), expired
        return None, expired

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`check` may next have something to do (None: no candidates)."""
        if not self._candidates:
            return None
        due = min(c.updated for c in self._candidates.values()) + self.expire_after
        if not self.idle(now):
            due = min(due, self.last_active + self.restart_idle)
        return due

    def adopt(self, frames: list[CandidateFrame]) -> list[CandidateFrame]:
        """``frames`` (from :meth:`received` or :meth:`check`) become the stream's new numbering; the
        caller opens them in order (:meth:`opened`) right away, before it stages anything else (their
        slots are free again). Returns every other candidate, discarded."""
        last = frames[-1]
        if not self.pinned:
            self.module_id = last.module_id
        self.pulse_mode = last.pulse_mode
        for frame in frames:
            self._release(frame)
        # the window restarts below the first adopted frame, so that they open in order
        self.image_id = self.frame_number = None
        return self.discard_all()

    def discard_all(self) -> list[CandidateFrame]:
        dropped = list(self._candidates.values())
        for frame in dropped:
            self._release(frame)
        return dropped

    def _release(self, frame: CandidateFrame) -> None:
        del self._candidates[(frame.image_id, frame.frame_number, frame.module_id)]
        self._free.append(frame.slot)

    def _evict(self) -> CandidateFrame:
        """Make room: the frame with the fewest packets, of those the one updated longest ago (a
        stray packet, rather than a frame being received or a complete one waiting for the next)."""
        victim = min(self._candidates.values(), key=lambda c: (c.n_packets, c.updated))
        self._release(victim)
        return victim

    def _same_numbering(self, a: CandidateFrame, b: CandidateFrame) -> bool:
        return a.module_id == b.module_id and a.pulse_mode is b.pulse_mode

    def _consecutive_complete(self, last: CandidateFrame) -> list[CandidateFrame] | None:
        """``confirm_frames`` complete frames ending at ``last``, frame numbers consecutive."""
        run = [last]
        ppf = self.packets_per_frame
        for back in range(1, self.confirm_frames):
            wanted = last.frame_number - back
            before = next(
                (c for c in self._candidates.values()
                 if c.frame_number == wanted and c.n_packets == ppf and self._same_numbering(c, last)
                 and c.image_id < run[0].image_id),
                None,
            )
            if before is None:
                return None
            run.insert(0, before)
        return run

    def _chain(self, last: CandidateFrame) -> list[CandidateFrame]:
        """``last`` and the half-complete frames of its numbering before it, oldest first."""
        half = (self.packets_per_frame + 1) // 2
        earlier = sorted(
            (c for c in self._candidates.values()
             if c is not last and self._same_numbering(c, last) and c.n_packets >= half
             and c.frame_number < last.frame_number and last.frame_number - c.frame_number <= self.ahead),
            key=lambda c: c.frame_number, reverse=True,
        )
        chain = [last]
        for c in earlier:
            if c.image_id < chain[0].image_id:
                chain.insert(0, c)
        return chain
