"""Hostile datagrams: packets that look like a detector's (right size, detector type, header version,
packet index) but are not the module's stream, sent at a steady rate beside a real one.

Kinds (what reaches a receiver's port from a spoofer, a misrouted or broken device):

* ``absurd``: numbers no detector sends: frame numbers 2**63..2**64-2, header module ids
  2..65535, bunch ids beyond any pulse id (huge or fractional);
* ``foreign-module``: a header module id other than the port's, frame numbers next to the real
  stream's (``near``);
* ``far-numbers``: the port's own module id, frame numbers anywhere below 2**48: no numbering;
* ``pulse-ids``: the port's own module id and the real stream's frame number with a random bunch
  id (a fake pulse id: the image id under ``image_id_source`` auto or pulse_id; Jungfrau only).

Payloads are random bytes, so a spoofed packet that reached an image would show as foreign pixels.
What the receivers must make of each kind (``REJECTED_AS``) is what the fault tests assert.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from enum import Enum

import numpy as np

from daq_backend.config import DetectorConfig, DetectorType, ImageIdSource
from daq_backend.detectors import layout_for
from daq_backend.detectors.sls import SLS_DETECTOR_TYPE, SLS_HEADER_VERSION, SlsLayout
from daq_backend.formats import SLS_HEADER_DTYPE


class SpoofKind(str, Enum):
    ABSURD = "absurd"
    FOREIGN_MODULE = "foreign-module"
    FAR_NUMBERS = "far-numbers"
    PULSE_IDS = "pulse-ids"


#: the receiver counter each kind ends up in
REJECTED_AS: dict[SpoofKind, str] = {
    SpoofKind.ABSURD: "rejected_out_of_range",
    SpoofKind.FOREIGN_MODULE: "rejected_module_id",
    SpoofKind.FAR_NUMBERS: "rejected_out_of_window",
    SpoofKind.PULSE_IDS: "rejected_out_of_window",
}

_N_PAYLOADS = 16


class Spoofer:
    """Sends ``n_packets`` hostile datagrams at ``rate_hz`` to the ports of ``config``'s modules,
    cycling through ``kinds`` and the modules (``run()`` blocks; ``start()`` runs a thread).

    ``module_ids``: the header module id each port's stream carries (default: the config's
    ``header_module_ids``, else the module number, as the built-in simulator sends); ``near``: the
    real stream's current frame number (default 1)."""

    def __init__(
        self,
        config: DetectorConfig,
        rate_hz: float,
        n_packets: int,
        kinds: Iterable[SpoofKind | str] = (SpoofKind.ABSURD,),
        *,
        near: Callable[[], int] | None = None,
        module_ids: dict[int, int] | None = None,
        dst_host: str | None = None,
        seed: int = 0,
    ) -> None:
        layout = layout_for(config)
        if not isinstance(layout, SlsLayout):
            raise ValueError(f"spoofing sends slsDetector headers; {config.detector_type.value} has none")
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if n_packets < 0:
            raise ValueError(f"n_packets must be >= 0, got {n_packets}")
        self.kinds = [SpoofKind(k) for k in kinds]
        if not self.kinds:
            raise ValueError("kinds: give at least one")
        uses_pulse = (config.detector_type is DetectorType.JUNGFRAU
                      and config.image_id_source is not ImageIdSource.FRAME_INDEX)
        if SpoofKind.PULSE_IDS in self.kinds and not uses_pulse:
            raise ValueError("pulse-ids: this detector's image ids are frame numbers, "
                             "a bunch id changes nothing")
        self.config = config
        self.layout = layout
        self.rate_hz = float(rate_hz)
        self.n_packets = n_packets
        self.modules = tuple(config.required_modules)
        self.module_ids = module_ids or {m: config.header_module_ids.get(m, m) for m in self.modules}
        self.near = near or (lambda: 1)
        self.dst_host = dst_host or config.udp_host
        self._rng = random.Random(seed)
        nprng = np.random.default_rng(seed)
        payload = layout.max_datagram - layout.header_size
        self._payloads = [nprng.integers(1, 256, payload, dtype=np.uint8).tobytes()
                          for _ in range(_N_PAYLOADS)]
        self._header = np.zeros(1, dtype=SLS_HEADER_DTYPE)
        self._header["detector_type"] = SLS_DETECTOR_TYPE[config.detector_type.value]
        self._header["header_version"] = SLS_HEADER_VERSION
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.n_sent = 0
        #: datagrams sent per (module, kind)
        self.sent: dict[tuple[int, SpoofKind], int] = {(m, k): 0 for m in self.modules for k in self.kinds}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what one datagram looks like ------------------------------------------------------------
    def datagram(self, module: int, kind: SpoofKind) -> bytes:
        rng = self._rng
        own = self.module_ids[module]
        near = max(int(self.near()), 1)
        h = self._header
        h["packetnum"] = rng.randrange(self.layout.packets_per_frame)
        h["row"], h["column"] = rng.randrange(4), rng.randrange(4)
        bunch = 0.0
        if kind is SpoofKind.ABSURD:
            frame = rng.randrange(2**63, 2**64 - 1)
            header_id = rng.randrange(2, 0x10000)
            bunch = rng.choice((float(rng.randrange(2**54, 2**63)), rng.randrange(1, 2**40) + 0.5))
        elif kind is SpoofKind.FOREIGN_MODULE:
            frame = near + rng.randrange(-2, 6)
            header_id = rng.randrange(0xFFFF)
            header_id += header_id >= own  # any 16-bit id but the port's own
        elif kind is SpoofKind.FAR_NUMBERS:
            frame = rng.randrange(near + 2_000_000, 2**48)
            header_id = own
        else:
            frame = near
            header_id = own
            bunch = float(rng.randrange(near + 2_000_000, 2**53))
        h["framenum"] = max(frame, 1)
        h["module_id"] = header_id
        if self.layout.bunchid_is_pulse_id:
            h["bunchid"] = bunch
        return h.tobytes() + self._payloads[rng.randrange(_N_PAYLOADS)]

    # -- sending ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Send every datagram, paced against a monotonic clock; returns early on :meth:`stop`."""
        t0 = time.monotonic()
        plan = [(m, k) for k in self.kinds for m in self.modules]
        while self.n_sent < self.n_packets and not self._stop.is_set():
            due = min(self.n_packets, int((time.monotonic() - t0) * self.rate_hz) + 1)
            while self.n_sent < due:
                module, kind = plan[self.n_sent % len(plan)]
                self._sock.sendto(self.datagram(module, kind), (self.dst_host, self.config.udp_port(module)))
                self.sent[(module, kind)] += 1
                self.n_sent += 1
            if self.n_sent < self.n_packets:
                self._stop.wait(max(0.0, t0 + self.n_sent / self.rate_hz - time.monotonic()))

    def start(self) -> Spoofer:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_safely, name="spoofer", daemon=True)
        self._thread.start()
        return self

    def _run_safely(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported to the owner through .error
            self.error = exc

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self) -> None:
        self._stop.set()
        self.wait(10)

    def close(self) -> None:
        self.stop()
        self._sock.close()

    def __enter__(self) -> Spoofer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def expected_rejections(self, module: int) -> dict[str, int]:
        """What ``module``'s receiver should count for what was sent to it, by counter."""
        out: dict[str, int] = {}
        for (m, kind), n in self.sent.items():
            if m == module:
                out[REJECTED_AS[kind]] = out.get(REJECTED_AS[kind], 0) + n
        return out

    def summary(self) -> str:
        by_kind: dict[str, int] = {}
        for (_, kind), n in self.sent.items():
            by_kind[kind.value] = by_kind.get(kind.value, 0) + n
        return f"spoofed {self.n_sent} datagrams (" + ", ".join(f"{k} {n}" for k, n in by_kind.items()) + ")"


def parse_kinds(text: str) -> Sequence[SpoofKind]:
    """``absurd,foreign-module`` -> kinds (argparse type)."""
    try:
        return [SpoofKind(k.strip()) for k in text.split(",") if k.strip()]
    except ValueError:
        known = ", ".join(k.value for k in SpoofKind)
        raise ValueError(f"--spoof: kinds are {known}, got {text!r}") from None
