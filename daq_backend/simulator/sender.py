"""UDP detector simulator: sends what Jungfrau, Eiger or GigaFRoST modules send, at a precise rate.

Module *m* goes to ``start_udp_port + m`` (Eiger: one half-module per port). Packets of all modules
are interleaved (packet 0 of every module, then packet 1 ...) as parallel hardware would. Datagrams
are described by a table of ``max_batch`` images' worth of scatter-gather messages: headers live in
one structured array refilled per batch (a template plus the frame number / pulse id columns, one
numpy assignment each), payloads are zero-copy pointers into the precomputed pattern (addresses for
the whole batch in one vectorised expression), and a batch goes out with one ``sendmmsg`` per
1024 datagrams. The Python cost is paid per batch, not per image, so small images (GigaFRoST: 16
datagrams per image) are not limited by the interpreter.

Pacing uses absolute deadlines on a monotonic clock, so jitter does not make the average rate drift.
Each wake-up sends every image whose deadline has passed (at most ``max_batch``): at low rates that
is one image per wake-up, exactly as before; at rates beyond what one wake-up per image allows the
images due are sent together. After a stall longer than ``max(period, CATCH_UP_S)`` the schedule
restarts (counted in ``n_schedule_slips``) instead of bursting to catch up.

Faults for tests: drop chosen packets or whole module frames, duplicate packets, reorder a module
frame's packets, and send garbage datagrams every N valid ones (such images are sent one at a time
through the general path); ``--spoof`` adds hostile datagrams from another socket at their own rate
(``simulator.spoof``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from daq_backend.config import ConfigError, DetectorConfig, DetectorType, load_config
from daq_backend.simulator.pattern import header_id_arrays, pattern_source
from daq_backend.simulator.udp import MAX_BATCH, MessageTable, address_of, open_send_socket

log = logging.getLogger(__name__)

PacketKey = tuple[int, int, int]  # (image_id, module_id, packet_index)
FrameKey = tuple[int, int]  # (image_id, module_id)
DropPackets = Iterable[PacketKey] | Callable[[int, int, int], bool] | None

#: most images one batch holds (fewer when their datagrams exceed one sendmmsg call's 1024)
MAX_IMAGES_PER_BATCH = 64
#: how far (seconds) a paced sender may fall behind and still send the images due in one burst;
#: beyond max(period, this) the schedule restarts
CATCH_UP_S = 0.002


class DetectorSimulator:
    """Sends ``n_images`` images (ids ``start_id, start_id+1, ...``) at ``rate_hz`` (0 = as fast as
    possible; ``n_images=None`` = until :meth:`stop`).

    ``out_of_order`` module frames send packets ``0, N-2, N-3, ..., 1, N-1`` (first and last in
    place, the middle reversed). ``garbage_every=N`` sends, after every N valid datagrams, one
    invalid datagram to the same port, cycling through: too short, too long, right size with an
    invalid header (packet index out of range / wrong GigaFRoST protocol id).

    ``max_batch`` images at most go out per ``sendmmsg`` batch (default: as many as fit into 1024
    datagrams, at most :data:`MAX_IMAGES_PER_BATCH`); ``max_batch=1`` sends one image per call.
    ``modules`` sends only these modules (default all; :class:`ParallelSimulator` splits them
    over processes)."""

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
        max_batch: int | None = None,
        modules: Sequence[int] | None = None,
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
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
        self.modules = tuple(config.required_modules) if modules is None else tuple(modules)
        unknown = set(self.modules) - set(config.required_modules)
        if unknown or not self.modules:
            raise ValueError(f"modules must be a non-empty subset of {list(config.required_modules)}, "
                             f"got {list(self.modules)}")
        #: monotonic time of image 0's deadline (None: when run() starts); several processes that
        #: each send some modules share one schedule this way
        self.start_at: float | None = None
        if config.detector_type is DetectorType.GIGAFROST and n_images is not None:
            # frame_index is 32 bit: fail now rather than in the middle of a run
            last = start_id + n_images - 1
            if last > 0xFFFFFFFF:
                raise ValueError(f"gigafrost frame_index is 32 bit, cannot send ids up to {last}")

        # message table: image slot b, packet i of module index k at b*n_valid + i*n_mod + k; then
        # garbage kind g of module index k at n_slots*n_valid + g*n_mod + k; parts = header, payload,
        # padding
        hs, ppf, n_mod = layout.header_size, layout.packets_per_frame, len(self.modules)
        self._n_valid = n_valid = ppf * n_mod
        self.max_batch = max_batch or max(1, min(MAX_IMAGES_PER_BATCH, MAX_BATCH // n_valid))
        n_slots = self.max_batch
        self._garbage_base = n_slots * n_valid
        self._garbage = [np.frombuffer(g, dtype=np.uint8) for g in _garbage_datagrams(layout)]
        destinations = [self.address(m) for _ in range(n_slots * ppf) for m in self.modules]
        destinations += [self.address(m) for _ in self._garbage for m in self.modules]
        self._sock = open_send_socket()
        table = self._table = MessageTable(self._sock, destinations, parts=3, use_sendmmsg=use_sendmmsg)

        # headers: one template row per (packet, module) in table order; the id columns are
        # rewritten per batch
        template = np.stack([layout.encode_headers(m, 0, 0) for m in self.modules], axis=1).reshape(-1)
        if template.dtype.itemsize != hs:
            raise ValueError(f"header dtype is {template.dtype.itemsize} bytes, header_size {hs}")
        self._template = template
        self._headers = np.empty((n_slots, n_valid), dtype=template.dtype)
        self._headers[...] = template
        self._frame_fields, self._pulse_fields = _id_fields(layout, self.modules[0])
        offsets = np.array([layout.packet_slice(i)[0] for i in range(ppf)], dtype=np.uint64)
        self._offsets = offsets[None, :, None]  # broadcast over (image, packet, module)
        lengths = np.array([layout.packet_slice(i)[1] for i in range(ppf)], dtype=np.uint64)
        padding = np.array([layout.datagram_size(i) - hs for i in range(ppf)], dtype=np.uint64) - lengths
        zeros = np.zeros(max(int(padding.max()), 1), dtype=np.uint8)
        table.keep("padding", zeros)
        table.keep("pattern", self.source)  # payload pieces point into its sequences
        table.keep("headers", self._headers)
        rows = slice(0, self._garbage_base)
        header_rows = np.arange(n_slots * n_valid, dtype=np.uint64)
        table.iov_base[rows, 0] = address_of(self._headers) + header_rows * hs
        table.iov_len[rows, 0] = hs
        table.iov_len[rows, 1] = np.tile(np.repeat(lengths, n_mod), n_slots)
        table.iov_base[rows, 2] = address_of(zeros)
        table.iov_len[rows, 2] = np.tile(np.repeat(padding, n_mod), n_slots)
        for k in range(n_mod):
            for g, data in enumerate(self._garbage):
                i = self._garbage_base + g * n_mod + k
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
        catch_up = max(period, CATCH_UP_S)
        try:
            t0 = time.monotonic() if self.start_at is None else self.start_at
            if self._t_first is None:
                self._t_first = max(t0, time.monotonic())
            k = 0
            while total is None or k < total:
                n = self.max_batch if total is None else min(self.max_batch, total - k)
                if period:
                    lag = time.monotonic() - (t0 + k * period)
                    if lag < 0:
                        if self._stop.wait(-lag):
                            break
                        lag = max(0.0, time.monotonic() - (t0 + k * period))
                    if lag > catch_up:
                        # a stall (descheduled, or a rate beyond this sender): re-anchor the
                        # schedule instead of bursting to catch up, which a real detector never does
                        t0 += lag
                        lag = 0.0
                        self.n_schedule_slips += 1
                    n = min(n, int(lag / period) + 1)  # the images whose deadline has passed
                if self._stop.is_set():
                    break
                self.send_images(self.start_id + k, n)
                k += n
                bar.update(n)
        finally:
            bar.close()

    def send_image(self, image_id: int) -> None:
        """Send one image now (every module frame), applying the configured faults."""
        self.send_images(image_id, 1)

    def send_images(self, first_id: int, count: int) -> None:
        """Send images ``first_id .. first_id + count - 1`` now, in batches of at most
        ``max_batch``; an image with a configured fault goes out alone through the general path."""
        now = time.monotonic()
        if self._t_first is None:
            self._t_first = now
        custom = self._drop_fn is not None or self.garbage_every > 0
        special = self._special_ids
        i = 0
        while i < count:
            image_id = first_id + i
            if custom or image_id in special:
                self._fill(image_id, 1)
                self._send_custom(image_id)
                n = 1
            else:
                n = min(count - i, self.max_batch)
                if special:
                    n = next((j for j in range(1, n) if image_id + j in special), n)
                self._fill(image_id, n)
                self.n_sent_packets += self._table.send(slice(0, n * self._n_valid))
            i += n
            self.n_sent_images += n
            self.last_sent_id = image_id + n - 1
            self._t_last = time.monotonic()

    def start(self) -> None:
        """Run in a background thread."""
        if self.running:
            raise RuntimeError("simulator is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_safely, name="detector-simulator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop sending (after the batch in flight: one image when paced at rates a wake-up per image
        keeps up with, at most ``max_batch`` free-running) and wait for the thread."""
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

    def _fill(self, first_id: int, n: int) -> None:
        """Headers and payload pointers of images ``first_id ..`` into the first ``n`` slots."""
        ids = np.arange(first_id, first_id + n, dtype=np.uint64)
        frame_numbers, pulse_ids = header_id_arrays(self.config, ids)
        headers = self._headers[:n]  # every other field keeps the template's value
        for name in self._frame_fields:
            headers[name] = frame_numbers[:, None]
        for name in self._pulse_fields:
            headers[name] = pulse_ids[:, None]
        addresses = self.source.address_table(self.modules, ids)
        payload = addresses[:, None, :] + self._offsets  # (image, packet, module): table order
        self._table.iov_base[: n * self._n_valid, 1] = payload.reshape(-1)

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
                            sequence.append(self._garbage_base + kind * n_mod + k)
                            self.n_garbage += 1
        self._table.send(sequence)
        self.n_sent_packets += n_valid


class ParallelSimulator:
    """The modules of one detector sent by ``processes`` :class:`DetectorSimulator` processes (module
    *k* by process ``k % processes``) on one shared schedule: every child builds its tables, then all
    start at the same monotonic deadline (CLOCK_MONOTONIC is system-wide). For detectors with several
    modules on machines where one process' sending is the limit. ``kwargs`` are DetectorSimulator's
    (faults apply to the modules of the process that sends them). ``run()`` blocks until every
    child is done; the counters are summed (images: those every process sent)."""

    def __init__(self, config: DetectorConfig, processes: int, **kwargs: Any) -> None:
        modules = tuple(config.required_modules)
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = min(processes, len(modules))
        self.config = config
        self.kwargs = {k: v for k, v in kwargs.items() if k != "progress"}
        if callable(self.kwargs.get("drop_packets")):
            raise ValueError("a drop_packets function cannot be sent to other processes; give a set")
        for key in ("drop_packets", "drop_frames", "duplicate", "out_of_order"):
            if self.kwargs.get(key) is not None:
                self.kwargs[key] = [tuple(k) for k in self.kwargs[key]]
        self.groups = [modules[i :: self.processes] for i in range(self.processes)]
        self.start_id = int(kwargs.get("start_id", 1))
        self.n_sent_images = self.n_sent_packets = self.n_dropped_packets = 0
        self.n_duplicated_packets = self.n_garbage = self.n_schedule_slips = 0
        self.elapsed = 0.0
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._last = self._ctx.Value("q", -1, lock=False)  # newest image id any child sent

    @property
    def last_sent_id(self) -> int | None:
        return None if self._last.value < 0 else int(self._last.value)

    @property
    def achieved_rate(self) -> float:
        return self.n_sent_images / self.elapsed if self.n_sent_images >= 2 and self.elapsed > 0 else 0.0

    def run(self) -> None:
        ready = self._ctx.Barrier(self.processes + 1)
        start = self._ctx.Queue()
        results = self._ctx.Queue()
        children = [
            self._ctx.Process(target=_parallel_child, name=f"simulator-{i}", daemon=True,
                              args=(self.config.model_dump_json(), group, self.kwargs, ready, start, results,
                                    self._last))
            for i, group in enumerate(self.groups)
        ]
        for child in children:
            child.start()
        try:
            ready.wait(timeout=120)
            start_at = time.monotonic() + 0.05
            for _ in children:
                start.put(start_at)
            reports = [results.get(timeout=None) for _ in children]
        finally:
            for child in children:
                child.join(timeout=30)
                if child.is_alive():
                    child.kill()
                    child.join()
        errors = [r["error"] for r in reports if r.get("error")]
        if errors:
            raise RuntimeError(f"a simulator process failed: {errors[0]}")
        self.n_sent_images = min(r["images"] for r in reports)
        self.n_sent_packets = sum(r["packets"] for r in reports)
        self.n_dropped_packets = sum(r["dropped"] for r in reports)
        self.n_duplicated_packets = sum(r["duplicated"] for r in reports)
        self.n_garbage = sum(r["garbage"] for r in reports)
        self.n_schedule_slips = sum(r["slips"] for r in reports)
        self.elapsed = max(r["t_last"] for r in reports) - min(r["t_first"] for r in reports)

    def summary(self) -> str:
        return (
            f"sent {self.n_sent_images} images ({self.n_sent_packets} packets) in {self.elapsed:.3f} s, "
            f"{self.achieved_rate:.1f} images/s from {self.processes} processes; dropped "
            f"{self.n_dropped_packets} packets, duplicated {self.n_duplicated_packets}, "
            f"garbage {self.n_garbage}"
        )

    def close(self) -> None:
        """Nothing to release: each ``run`` starts and joins its own sender processes, which close
        their sockets when they end (kept so it is used like :class:`DetectorSimulator`)."""

    def __enter__(self) -> ParallelSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parallel_child(config_json: str, modules: tuple[int, ...], kwargs: dict[str, Any], ready: Any,
                    start: Any, results: Any, last: Any) -> None:
    """One process of :class:`ParallelSimulator`: build, wait for the common start, send, report."""
    report: dict[str, Any] = {"images": 0, "packets": 0, "dropped": 0, "duplicated": 0, "garbage": 0,
                              "slips": 0, "t_first": 0.0, "t_last": 0.0}
    try:
        class Shared(DetectorSimulator):
            def send_images(self, first_id: int, count: int) -> None:
                super().send_images(first_id, count)
                if first_id + count - 1 > last.value:
                    last.value = first_id + count - 1

        with Shared(DetectorConfig.model_validate_json(config_json), modules=modules, **kwargs) as sim:
            ready.wait(timeout=120)
            sim.start_at = start.get(timeout=120)
            sim.run()
            report.update(images=sim.n_sent_images, packets=sim.n_sent_packets, dropped=sim.n_dropped_packets,
                          duplicated=sim.n_duplicated_packets, garbage=sim.n_garbage,
                          slips=sim.n_schedule_slips, t_first=sim._t_first or 0.0, t_last=sim._t_last or 0.0)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        report["error"] = f"{type(exc).__name__}: {exc}"
    results.put(report)


def _key(value: Any, n: int, what: str) -> Any:
    """``value`` as a tuple of ``n`` integers (typed ``Any``: each caller's key type fixes ``n``)."""
    try:
        key = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a tuple of {n} integers, got {value!r}") from None
    if len(key) != n:
        raise ValueError(f"{what}: expected a tuple of {n} integers, got {value!r}")
    return key


def _id_fields(layout: Any, module_id: int) -> tuple[list[str], list[str]]:
    """The header fields that carry the frame number and the pulse id: those that change, and
    equal the number given, when only that number changes in ``encode_headers``."""
    base = layout.encode_headers(module_id, 5, 0)
    frame = layout.encode_headers(module_id, 6, 0)
    names = base.dtype.names or ()
    frame_fields = [n for n in names if not np.array_equal(base[n], frame[n])]
    pulse_fields: list[str] = []
    try:
        pulse = layout.encode_headers(module_id, 5, 7)
        pulse_fields = [n for n in names if not np.array_equal(base[n], pulse[n])]
    except (TypeError, ValueError):
        pass
    if not all(np.all(frame[n] == 6) for n in frame_fields) or not all(
        np.all(layout.encode_headers(module_id, 5, 7)[n] == 7) for n in pulse_fields
    ):
        raise ValueError(f"{type(layout).__name__}: frame number / pulse id are not plain header fields")
    return frame_fields, pulse_fields


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
    parser.add_argument("--max-batch", type=int, default=None, metavar="N",
                        help="at most N images per sendmmsg batch (default: up to 1024 datagrams, at most "
                             f"{MAX_IMAGES_PER_BATCH} images; 1 = one image per call)")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="send the modules from N processes on one schedule (module k from process "
                             "k %% N; at most one per module; default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the simulator as ``args`` (from :func:`add_arguments`) say; returns the exit code."""
    try:
        config = load_config(args.config)
        options: dict[str, Any] = dict(
            rate_hz=args.rate, n_images=args.n_images, start_id=args.start_id, dst_host=args.host,
            start_udp_port=args.port, drop_packets=args.drop_packet, drop_frames=args.drop_frame,
            duplicate=args.duplicate, garbage_every=args.garbage_every, out_of_order=args.out_of_order,
            progress=not args.no_progress, max_batch=args.max_batch,
        )
        sim: DetectorSimulator | ParallelSimulator
        if args.processes > 1:
            sim = ParallelSimulator(config, args.processes, **options)
        else:
            sim = DetectorSimulator(config, **options)
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
