"""UDP detector simulator: sends what Jungfrau, Eiger or GigaFRoST modules send, at a precise rate.

Module *m* goes to ``start_udp_port + m`` (Eiger: one half-module per port). Packets of all modules
are interleaved (packet 0 of every module, then packet 1 ...) as parallel hardware would. Datagrams
are pre-encoded into one buffer per module that is refilled in place per image (headers: one numpy
assignment; payload: a zero-copy slice of the precomputed pattern), then sent with one ``sendmmsg``.
Pacing uses absolute deadlines on a monotonic clock, so jitter does not make the average rate drift;
after a stall longer than one period the schedule restarts (counted in ``n_schedule_slips``) instead
of bursting to catch up.

Faults for tests: drop chosen packets or whole module frames, duplicate packets, reorder a module
frame's packets, and send garbage datagrams every N valid ones; ``--spoof`` adds hostile datagrams
from another socket at their own rate (``simulator.spoof``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm import tqdm

from daq_backend.config import ConfigError, DetectorConfig, DetectorType, load_config
from daq_backend.simulator.pattern import header_ids, pattern_source
from daq_backend.simulator.udp import MessageTable, address_of, open_send_socket

log = logging.getLogger(__name__)

PacketKey = tuple[int, int, int]  # (image_id, module_id, packet_index)
FrameKey = tuple[int, int]  # (image_id, module_id)
DropPackets = Iterable[PacketKey] | Callable[[int, int, int], bool] | None


class DetectorSimulator:
    """Sends ``n_images`` images (ids ``start_id, start_id+1, ...``) at ``rate_hz`` (0 = as fast as
    possible; ``n_images=None`` = until :meth:`stop`).

    ``out_of_order`` module frames send packets ``0, N-2, N-3, ..., 1, N-1`` (first and last in
    place, the middle reversed). ``garbage_every=N`` sends, after every N valid datagrams, one
    invalid datagram to the same port, cycling through: too short, too long, right size with an
    invalid header (packet index out of range / wrong GigaFRoST protocol id)."""

    def __init__(
        self,
        config: DetectorConfig,
        rate_hz: float = 0.0,
        n_images: int | None = 1,
        start_id: int = 1,
        dst_host: str = "127.0.0.1",
        start_udp_port: int | None = None,
        drop_packets: DropPackets = None,
        drop_frames: Iterable[FrameKey] | None = None,
        duplicate: Iterable[PacketKey] | None = None,
        garbage_every: int = 0,
        out_of_order: Iterable[FrameKey] | None = None,
        progress: bool = False,
        use_sendmmsg: bool = True,
    ) -> None:
        if rate_hz < 0:
            raise ValueError(f"rate_hz must be >= 0 (0 = unlimited), got {rate_hz}")
        if n_images is not None and n_images < 0:
            raise ValueError(f"n_images must be >= 0, got {n_images}")
        if start_id < 0:
            raise ValueError(f"start_id must be >= 0, got {start_id}")
        if garbage_every < 0:
            raise ValueError(f"garbage_every must be >= 0, got {garbage_every}")
        self.config = config
        self.rate_hz = float(rate_hz)
        self.n_images = n_images
        self.start_id = start_id
        self.dst_host = dst_host
        self.start_udp_port = config.start_udp_port if start_udp_port is None else start_udp_port
        self.progress = progress
        self.garbage_every = garbage_every

        self._drop_fn: Callable[[int, int, int], bool] | None = None
        self._drop_packets: set[PacketKey] = set()
        if callable(drop_packets):
            self._drop_fn = drop_packets
        elif drop_packets is not None:
            self._drop_packets = {_key(k, 3, "drop_packets") for k in drop_packets}
        self._drop_frames = {_key(k, 2, "drop_frames") for k in (drop_frames or ())}
        self._duplicate = {_key(k, 3, "duplicate") for k in (duplicate or ())}
        self._out_of_order = {_key(k, 2, "out_of_order") for k in (out_of_order or ())}
        self._special_ids = (
            {k[0] for k in self._drop_packets} | {k[0] for k in self._drop_frames}
            | {k[0] for k in self._duplicate} | {k[0] for k in self._out_of_order}
        )

        self.source = pattern_source(config)
        self.layout = layout = self.source.layout
        self.modules = tuple(config.required_modules)
        if config.detector_type is DetectorType.GIGAFROST and n_images is not None:
            # frame_index is 32 bit: fail now rather than in the middle of a run
            last = start_id + n_images - 1
            if last > 0xFFFFFFFF:
                raise ValueError(f"gigafrost frame_index is 32 bit, cannot send ids up to {last}")

        # message table: valid packet i of module index k at i*n_mod + k, then garbage kind g of
        # module index k at n_valid + g*n_mod + k; parts = header, payload, padding
        hs, ppf, n_mod = layout.header_size, layout.packets_per_frame, len(self.modules)
        self._n_valid = ppf * n_mod
        self._garbage = [np.frombuffer(g, dtype=np.uint8) for g in _garbage_datagrams(layout)]
        destinations = [self.address(m) for _ in range(ppf) for m in self.modules]
        destinations += [self.address(m) for _ in self._garbage for m in self.modules]
        self._sock = open_send_socket()
        table = self._table = MessageTable(self._sock, destinations, parts=3, use_sendmmsg=use_sendmmsg)
        self._headers = {m: np.zeros((ppf, hs), dtype=np.uint8) for m in self.modules}
        self._offsets = np.array([layout.packet_slice(i)[0] for i in range(ppf)], dtype=np.uint64)
        lengths = np.array([layout.packet_slice(i)[1] for i in range(ppf)], dtype=np.uint64)
        padding = np.array([layout.datagram_size(i) - hs for i in range(ppf)], dtype=np.uint64) - lengths
        zeros = np.zeros(max(int(padding.max()), 1), dtype=np.uint8)
        table.keep("padding", zeros)
        table.keep("pattern", self.source)  # payload pieces point into its sequences
        self._msg_index: dict[int, np.ndarray] = {}
        for k, m in enumerate(self.modules):
            idx = np.arange(ppf) * n_mod + k
            self._msg_index[m] = idx
            table.keep(("headers", m), self._headers[m])
            table.iov_base[idx, 0] = address_of(self._headers[m]) + np.arange(ppf, dtype=np.uint64) * hs
            table.iov_len[idx, 0] = hs
            table.iov_len[idx, 1] = lengths
            table.iov_base[idx, 2] = address_of(zeros)
            table.iov_len[idx, 2] = padding
            for g, data in enumerate(self._garbage):
                i = self._n_valid + g * n_mod + k
                table.iov_base[i, 0] = address_of(data)
                table.iov_len[i, 0] = data.nbytes
        table.keep("garbage", self._garbage)
        self._garbage_kind = 0
        self._since_garbage = 0
        for m in self.modules:  # build the pattern now, not during the first (timed) image
            self.source.frame_bytes(m, start_id)

        self.n_sent_images = 0
        self.n_sent_packets = 0
        self.n_dropped_packets = 0
        self.n_duplicated_packets = 0
        self.n_garbage = 0
        #: times the sender fell more than one period behind and restarted its schedule
        self.n_schedule_slips = 0
        self.last_sent_id: int | None = None
        self.error: BaseException | None = None
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public --------------------------------------------------------------------------------
    def address(self, module_id: int) -> tuple[str, int]:
        return (self.dst_host, self.start_udp_port + module_id)

    @property
    def uses_sendmmsg(self) -> bool:
        return self._table.use_sendmmsg

    @property
    def elapsed(self) -> float:
        """Seconds from the first image's send to the last one's end."""
        if self._t_first is None or self._t_last is None:
            return 0.0
        return self._t_last - self._t_first

    @property
    def achieved_rate(self) -> float:
        """Images per second actually sent (0 before two images went out)."""
        if self.n_sent_images < 2 or self.elapsed <= 0:
            return 0.0
        return self.n_sent_images / self.elapsed

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Send every image (blocking); returns early when :meth:`stop` is called."""
        total = self.n_images
        bar = tqdm(total=total, unit="img", disable=not self.progress, desc=self.config.detector_name)
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        try:
            t0 = time.monotonic()
            if self._t_first is None:
                self._t_first = t0
            k = 0
            while total is None or k < total:
                if period:
                    delay = t0 + k * period - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                    if delay < -period:
                        # a stall of more than one period (descheduled): re-anchor the schedule
                        # instead of bursting to catch up, which a real detector never does
                        t0 -= delay
                        self.n_schedule_slips += 1
                if self._stop.is_set():
                    break
                self.send_image(self.start_id + k)
                k += 1
                bar.update(1)
        finally:
            bar.close()

    def send_image(self, image_id: int) -> None:
        """Send one image now (every module frame), applying the configured faults."""
        self._point(image_id)
        now = time.monotonic()
        if self._t_first is None:
            self._t_first = now
        if image_id in self._special_ids or self._drop_fn is not None or self.garbage_every:
            self._send_custom(image_id)
        else:
            self.n_sent_packets += self._table.send(slice(0, self._n_valid))
        self._t_last = time.monotonic()
        self.n_sent_images += 1
        self.last_sent_id = image_id

    def start(self) -> None:
        """Run in a background thread."""
        if self.running:
            raise RuntimeError("simulator is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_safely, name="detector-simulator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop sending (after the image in flight) and wait for the thread."""
        self._stop.set()
        self.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background run to end; True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def close(self) -> None:
        self.stop()
        self._sock.close()

    def __enter__(self) -> DetectorSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> str:
        return (
            f"sent {self.n_sent_images} images ({self.n_sent_packets} packets) in {self.elapsed:.3f} s, "
            f"{self.achieved_rate:.1f} images/s; dropped {self.n_dropped_packets} packets, "
            f"duplicated {self.n_duplicated_packets}, garbage {self.n_garbage}"
        )

    # -- internals -----------------------------------------------------------------------------
    def _run_safely(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported to the owner through .error
            self.error = exc
            log.exception("simulator failed")

    def _point(self, image_id: int) -> None:
        """Encode this image's headers and point every payload piece at its pattern bytes."""
        frame_number, pulse_id = header_ids(self.config, image_id)
        hs = self.layout.header_size
        table = self._table
        for m in self.modules:
            headers = self.layout.encode_headers(m, frame_number, pulse_id)
            self._headers[m][...] = headers.view(np.uint8).reshape(len(headers), hs)
            frame = self.source.frame_bytes(m, image_id)  # a view into PatternSource memory
            table.iov_base[self._msg_index[m], 1] = address_of(frame) + self._offsets

    def _packet_order(self, image_id: int, module_id: int) -> list[int]:
        n = self.layout.packets_per_frame
        if (image_id, module_id) in self._out_of_order and n > 2:
            return [0, *range(n - 2, 0, -1), n - 1]
        return list(range(n))

    def _send_custom(self, image_id: int) -> None:
        orders = {m: self._packet_order(image_id, m) for m in self.modules}
        n_mod = len(self.modules)
        sequence: list[int] = []
        n_valid = 0
        for step in range(self.layout.packets_per_frame):
            for k, m in enumerate(self.modules):
                packet = orders[m][step]
                if (image_id, m) in self._drop_frames or (image_id, m, packet) in self._drop_packets or (
                    self._drop_fn is not None and self._drop_fn(image_id, m, packet)
                ):
                    self.n_dropped_packets += 1
                    continue
                copies = 2 if (image_id, m, packet) in self._duplicate else 1
                self.n_duplicated_packets += copies - 1
                for _ in range(copies):
                    sequence.append(packet * n_mod + k)
                    n_valid += 1
                    if self.garbage_every:
                        self._since_garbage += 1
                        if self._since_garbage >= self.garbage_every:
                            self._since_garbage = 0
                            kind = self._garbage_kind % len(self._garbage)
                            self._garbage_kind += 1
                            sequence.append(self._n_valid + kind * n_mod + k)
                            self.n_garbage += 1
        self._table.send(sequence)
        self.n_sent_packets += n_valid


def _key(value: Any, n: int, what: str) -> tuple[int, ...]:
    try:
        key = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a tuple of {n} integers, got {value!r}") from None
    if len(key) != n:
        raise ValueError(f"{what}: expected a tuple of {n} integers, got {value!r}")
    return key


def _payload_runs(layout: Any) -> list[tuple[int, int, int, int]]:
    """Group consecutive packets with equal payload size into (first, count, offset, nbytes) runs so
    a frame is copied into the datagram buffer with one numpy assignment per run."""
    runs: list[tuple[int, int, int, int]] = []
    for i in range(layout.packets_per_frame):
        offset, nbytes = layout.packet_slice(i)
        if runs:
            first, count, off0, n0 = runs[-1]
            if n0 == nbytes and off0 + count * n0 == offset:
                runs[-1] = (first, count + 1, off0, n0)
                continue
        runs.append((i, 1, offset, nbytes))
    return runs


def _garbage_datagrams(layout: Any) -> list[bytes]:
    """Invalid datagrams of three kinds; each must be rejected by ``layout.parse``."""
    right_size = bytearray(b"\x5a" * layout.datagram_size(0))
    if layout.config.detector_type is DetectorType.GIGAFROST:
        right_size[0] = 0x00  # not protocol 0xCB
    else:
        right_size[12:16] = (0xFFFFFFFF).to_bytes(4, "little")  # packet number out of range
    return [b"\xa5" * 17, b"\xa5" * (layout.max_datagram + 100), bytes(right_size)]


# -- command line ------------------------------------------------------------------------------


def _parse_ints(text: str, n: int, what: str) -> tuple[int, ...]:
    parts = text.split(":")
    if len(parts) != n:
        shape = ":".join(["IMG", "MOD", "PKT"][:n])
        raise argparse.ArgumentTypeError(f"{what}: expected {shape}, got {text!r}")
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``std-daq simulate`` options (for embedding in the main CLI's sub-parser)."""
    parser.add_argument("config", help="detector JSON config")
    parser.add_argument(
        "--rate", type=float, default=10.0, help="images per second (0 = as fast as possible)"
    )
    parser.add_argument("--n-images", type=int, required=True, help="number of images to send")
    parser.add_argument("--start-id", type=int, default=1, help="first image id (default 1)")
    parser.add_argument("--host", default="127.0.0.1", help="destination host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="override the config's start_udp_port")
    parser.add_argument(
        "--drop-packet", action="append", default=[], metavar="IMG:MOD:PKT",
        type=lambda s: _parse_ints(s, 3, "--drop-packet"), help="do not send this packet (repeatable)",
    )
    parser.add_argument(
        "--drop-frame", action="append", default=[], metavar="IMG:MOD",
        type=lambda s: _parse_ints(s, 2, "--drop-frame"), help="do not send this module frame (repeatable)",
    )
    parser.add_argument(
        "--duplicate", action="append", default=[], metavar="IMG:MOD:PKT",
        type=lambda s: _parse_ints(s, 3, "--duplicate"), help="send this packet twice (repeatable)",
    )
    parser.add_argument(
        "--out-of-order", action="append", default=[], metavar="IMG:MOD",
        type=lambda s: _parse_ints(s, 2, "--out-of-order"),
        help="send this module frame's middle packets in reverse order (repeatable)",
    )
    parser.add_argument("--garbage-every", type=int, default=0, metavar="N",
                        help="send an invalid datagram after every N valid ones")
    parser.add_argument("--spoof", default="", metavar="KIND[,KIND]",
                        help="also send hostile datagrams of these kinds (absurd, foreign-module, "
                             "far-numbers, pulse-ids) from another socket, cycling over kinds and modules")
    parser.add_argument("--spoof-rate", type=float, default=1000.0, metavar="HZ",
                        help="hostile datagrams per second (default 1000)")
    parser.add_argument("--spoof-count", type=int, default=1000, metavar="N",
                        help="hostile datagrams in all (default 1000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the simulator as ``args`` (from :func:`add_arguments`) say; returns the exit code."""
    try:
        config = load_config(args.config)
        sim = DetectorSimulator(
            config, rate_hz=args.rate, n_images=args.n_images, start_id=args.start_id, dst_host=args.host,
            start_udp_port=args.port, drop_packets=args.drop_packet, drop_frames=args.drop_frame,
            duplicate=args.duplicate, garbage_every=args.garbage_every, out_of_order=args.out_of_order,
            progress=not args.no_progress,
        )
        spoofer = None
        if args.spoof:
            from daq_backend.simulator.spoof import Spoofer, parse_kinds

            spoofer = Spoofer(config, args.spoof_rate, args.spoof_count, parse_kinds(args.spoof),
                              near=lambda: sim.last_sent_id or args.start_id, dst_host=args.host)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"std-daq simulate: {exc}", file=sys.stderr)
        return 2
    with sim:
        try:
            if spoofer is not None:
                spoofer.start()
            sim.run()
            if spoofer is not None:
                spoofer.wait()
        except KeyboardInterrupt:
            print(f"interrupted: {sim.summary()}", file=sys.stderr)
            return 130
        finally:
            if spoofer is not None:
                spoofer.close()
    print(sim.summary())
    if spoofer is not None:
        print(spoofer.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``std-daq simulate CONFIG --rate HZ --n-images N [...]``."""
    parser = argparse.ArgumentParser(
        prog="std-daq simulate", description="Send simulated detector UDP packets to start_udp_port + module."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
