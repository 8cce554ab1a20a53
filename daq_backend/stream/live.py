"""Live stream for viewers: Array-1.0 two-part messages (reference §3.5, Era C ``std_live_stream``).

Part 1 is JSON ``{"htype": "array-1.0", "shape": [height, width], "type": "uint16", "frame": <image id>,
...}``, part 2 the raw pixels. Which images go out is the seed's ``live_stream_configs`` selection:
``forward`` = every image; ``periodic [n, f]`` = bursts of n consecutive images at f Hz;
``batch [n, m]`` = images with ``image_id % m < n``; optionally thinned to every n-th selected image.

Viewers must never slow the DAQ: the socket is an XPUB (a PUB that also sees subscriptions) with a
low HWM, so a slow viewer just misses images; with no viewer at all nothing is copied. Each image
is copied out of the ring and the slot's seqlock checked before sending, so a viewer never gets a
half-overwritten image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from daq_backend import ipc
from daq_backend.config import DetectorConfig, load_config
from daq_backend.formats import Encoding, ImageMetadata, ImageStatus
from daq_backend.ram_buffer import AttachedRing, SlotOverwritten
from daq_backend.stats import Counters, StatsReporter, service_name
from daq_backend.supervisor import run_service

log = logging.getLogger(__name__)

MODES = ("forward", "periodic", "batch")


@dataclass
class LiveStats(Counters):
    images: int = 0  # ImageMetadata seen
    selected: int = 0
    sent: int = 0
    bytes: int = 0
    no_viewer: int = 0  # selected while nobody subscribed: not even read
    lapped: int = 0
    dropped_by_hwm: int = 0
    not_raw: int = 0  # encoded images are not decoded for viewers
    bad_messages: int = 0
    viewers: int = 0
    last_image_id: int = 0


class Selection:
    """The seed's image selection; ``clock`` is injectable so the periodic mode can be tested."""

    def __init__(
        self,
        mode: str = "forward",
        param: Sequence[float] | None = None,
        every_nth: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"live stream mode: {mode!r} is not one of {', '.join(MODES)}")
        if every_nth < 1:
            raise ValueError(f"live stream every_nth: must be >= 1, got {every_nth}")
        self.mode, self.every_nth, self._clock = mode, every_nth, clock
        self.n, self.m, self.f = 1, 1, 1.0
        if mode != "forward":
            if param is None or len(param) != 2:
                second = "f" if mode == "periodic" else "m"
                raise ValueError(
                    f"live stream mode {mode}: param must be two numbers [n, {second}], got {param}"
                )
            n = param[0]
            if int(n) != n or n < 1:
                raise ValueError(f"live stream mode {mode}: n must be a positive integer, got {n}")
            self.n = int(n)
            if mode == "periodic":
                if not param[1] > 0:
                    raise ValueError(f"live stream mode periodic: f must be > 0 Hz, got {param[1]}")
                self.f = float(param[1])
            else:
                m = param[1]
                if int(m) != m or not self.n <= m:
                    raise ValueError(f"live stream mode batch: m must be an integer >= n={self.n}, got {m}")
                self.m = int(m)
        self._burst_left = 0
        self._next_burst = -float("inf")
        self._count = 0

    def __call__(self, image_id: int) -> bool:
        if self.mode == "batch":
            chosen = image_id % self.m < self.n
        elif self.mode == "periodic":
            now = self._clock()
            if self._burst_left == 0 and now >= self._next_burst:
                self._burst_left = self.n
                # Bursts stay on a 1/f grid; after a pause longer than a period the grid restarts now.
                following = self._next_burst + 1 / self.f
                self._next_burst = following if following > now else now + 1 / self.f
            chosen = self._burst_left > 0
            if chosen:
                self._burst_left -= 1
        else:
            chosen = True
        if not chosen:
            return False
        self._count += 1
        return (self._count - 1) % self.every_nth == 0


def array10_header(meta: ImageMetadata, detector_name: str) -> dict[str, Any]:
    return {
        "htype": "array-1.0",
        "shape": [meta.height, meta.width],
        "type": str(meta.numpy_dtype),
        "frame": meta.id,
        "is_good_frame": meta.status == ImageStatus.GOOD,
        "n_missing_packets": meta.n_missing_packets,
        "detector_name": detector_name,
    }


class LiveStream:
    """PUBlishes selected images of ``config``'s ring as Array-1.0 on ``bind_address``.
    ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        config: DetectorConfig,
        bind_address: str,
        mode: str = "forward",
        param: Sequence[float] | None = None,
        *,
        every_nth: int = 1,
        sndhwm: int = 4,
        clock: Callable[[], float] = time.monotonic,
        stats_interval: float = 1.0,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        self.selection = Selection(mode, param, every_nth, clock)
        self.stats = LiveStats()
        self._ring = AttachedRing(ipc.image_ring_name(config.detector_name))
        self._stop = threading.Event()
        self._closed = False
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, 1000)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(ipc.image_metadata_address(config.detector_name))
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.SNDHWM, sndhwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, so viewers can be counted
        try:
            self._pub.bind(bind_address)
        except zmq.ZMQError as exc:
            self._sub.close()
            self._pub.close()
            raise ValueError(f"live stream: cannot bind {bind_address!r}: {exc}") from None
        self.address = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._reporter = StatsReporter(
            config.detector_name, service_name("live-stream"), self.snapshot,
            interval=stats_interval, context=self._ctx,
        )

    def snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._pub, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(100))
            if self._pub in events:
                self._on_subscriptions()
            if self._sub in events:
                for _ in range(256):
                    try:
                        raw = self._sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_metadata(raw)
            self._reporter.tick()

    def _on_subscriptions(self) -> None:
        while True:
            try:
                msg = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self.stats.viewers += 1
            elif msg[:1] == b"\x00":
                self.stats.viewers = max(0, self.stats.viewers - 1)

    def _on_metadata(self, raw: bytes) -> None:
        st = self.stats
        try:
            meta = ImageMetadata.unpack(raw)
        except ValueError:
            st.bad_messages += 1
            return
        st.images += 1
        self._handle(meta)
        st.last_image_id = meta.id  # after the send: "image X done" for whoever watches

    def _handle(self, meta: ImageMetadata) -> None:
        st = self.stats
        if not self.selection(meta.id):
            return
        st.selected += 1
        if st.viewers == 0:
            st.no_viewer += 1
            return
        if meta.encoding != Encoding.RAW:
            st.not_raw += 1
            return
        data = self._read(meta)
        if data is None:
            st.lapped += 1
            return
        self._send(meta, data)

    def _read(self, meta: ImageMetadata) -> bytes | None:
        """A consistent copy of the image, re-attaching once if the producer re-created the ring."""
        nbytes = meta.height * meta.width * meta.numpy_dtype.itemsize
        for _ in range(2):
            ring = self._ring.get()
            try:
                if ring is not None and nbytes <= ring.slot_nbytes:
                    data = ring.view(meta.id)[:nbytes].tobytes()
                    ring.check(meta.id)
                    return data
            except SlotOverwritten:
                pass
            if not self._ring.refreshed():
                return None
        return None

    def _send(self, meta: ImageMetadata, data: bytes) -> None:
        header = json.dumps(array10_header(meta, self.config.detector_name)).encode()
        try:
            self._pub.send_multipart([header, data], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.stats.dropped_by_hwm += 1
            return
        self.stats.sent += 1
        self.stats.bytes += len(data)

    def stop(self) -> None:
        self._stop.set()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="live-stream", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reporter.close()
        self._sub.close()
        self._pub.close()
        self._ring.close()

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _param(text: str) -> list[float]:
    try:
        values = json.loads(text)
    except ValueError:
        values = [float(v) for v in text.replace(",", " ").split()]
    if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
        raise argparse.ArgumentTypeError(f"expected two numbers like '[10, 1]' or '10,1', got {text!r}")
    return [float(v) for v in values]


def main(argv: list[str] | None = None) -> int:
    """std-daq live-stream CONFIG --address tcp://*:PORT --mode forward|periodic|batch [--param n,x]"""
    parser = argparse.ArgumentParser(prog="std-daq live-stream", description=main.__doc__)
    parser.add_argument("config", help="detector JSON file")
    parser.add_argument(
        "--address", default=None, help="address to bind (default: the detector's ipc live stream)"
    )
    parser.add_argument("--mode", choices=MODES, default="forward")
    parser.add_argument("--param", type=_param, default=None,
                        help="periodic: 'n,f' (n images every 1/f s); batch: 'n,m' (image_id %% m < n)")
    parser.add_argument("--every-nth", type=int, default=1, help="then send only every n-th selected image")
    parser.add_argument("--hwm", type=int, default=4, help="send high-water mark per viewer")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(args.config)
    address = args.address or ipc.live_stream_address(config.detector_name)
    try:
        live = LiveStream(config, address, args.mode, args.param, every_nth=args.every_nth, sndhwm=args.hwm)
    except ValueError as exc:
        parser.error(str(exc))
    log.info("live stream of %s on %s (%s %s)", config.detector_name, live.address, args.mode, args.param)
    return run_service(live)


if __name__ == "__main__":
    sys.exit(main())
