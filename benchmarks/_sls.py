"""The virtual Jungfrau as a benchmark source, and ``slsReceiver``'s binary output read back.

Why slsdet directly and not :class:`daq_backend.control.sls.SlsDetectorControl`: the control API
deliberately offers no receiver commands (``rx_hostname``, ``fwrite``, ``fpath``, ``rx_framescaught``,
``rx_udpsocksize`` ...), and the benchmark needs exactly those to run the C++ reference receiver. The
benchmark is a standalone program, so slsdet's blocking calls in this process are harmless here.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daq_backend.control.sls import remove_client_shm
from daq_backend.control.virtual import SlsReceiverProcess, VirtualDetectorServer

log = logging.getLogger(__name__)

#: ``sls_receiver_header`` in front of every frame of a binary file: sls_detector_header (48 bytes:
#: frameNumber u64, expLength u32, packetNumber u32, ...) + a 512-bit packet mask.
SLS_FRAME_HEADER = 112
JUNGFRAU_PACKETS_PER_FRAME = 128
JUNGFRAU_FRAME_BYTES = 512 * 1024 * 2
#: Shortest exposure; the virtual server sleeps it per frame, so it adds to the frame time.
EXPTIME_S = 1e-6


@dataclass(frozen=True)
class SlsFiles:
    """What ``slsReceiver`` wrote: frames in its data files and how many of them are complete."""

    frames: int
    complete: int
    frame_numbers: np.ndarray

    def missing(self, expected: range) -> int:
        return len(expected) - int(np.isin(np.asarray(expected), self.frame_numbers).sum())


def sls_data_files(folder: Path) -> list[Path]:
    """Data files (``<fname>_d<i>_f<j>_<index>.raw``), not the master file."""
    return sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(str(folder)), "*_d*_f*_*.raw")))


def sls_frames_on_disk(folder: Path, frame_bytes: int = JUNGFRAU_FRAME_BYTES) -> int:
    """Whole frames in the data files right now (cheap: file sizes only)."""
    total = 0
    for path in sls_data_files(folder):
        try:
            total += path.stat().st_size // (SLS_FRAME_HEADER + frame_bytes)
        except FileNotFoundError:
            continue
    return total


def read_sls_files(folder: Path, frame_bytes: int = JUNGFRAU_FRAME_BYTES,
                   packets_per_frame: int = JUNGFRAU_PACKETS_PER_FRAME) -> SlsFiles:
    """Frame numbers and packet counts from every frame header of the binary data files."""
    record = SLS_FRAME_HEADER + frame_bytes
    numbers: list[np.ndarray] = []
    complete = 0
    for path in sls_data_files(folder):
        n = path.stat().st_size // record
        if n == 0:
            continue
        raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, record))
        numbers.append(np.ascontiguousarray(raw[:, 0:8]).view("<u8").ravel().copy())
        packets = np.ascontiguousarray(raw[:, 12:16]).view("<u4").ravel()
        complete += int((packets == packets_per_frame).sum())
        del raw
    frame_numbers = np.concatenate(numbers) if numbers else np.zeros(0, dtype=np.uint64)
    return SlsFiles(int(frame_numbers.size), complete, frame_numbers)


class VirtualJungfrau:
    """The virtual Jungfrau server and one slsdet client of it, with the settings a run needs."""

    def __init__(self, log_dir: Path) -> None:
        self.server = VirtualDetectorServer("jungfrau", log_path=log_dir / "jungfrau-server.log")
        self.det: Any = None
        self.receiver: SlsReceiverProcess | None = None
        self._dst_port: int | None = None

    @property
    def pid(self) -> int:
        assert self.server.pid is not None
        return self.server.pid

    @property
    def stop_server_pid(self) -> int | None:
        return self.server.stop_pid

    def start(self) -> VirtualJungfrau:
        import slsdet

        self.server.start()
        det = slsdet.Detector(self.server.shm_id)
        det.hostname = [self.server.hostname]
        det.powerchip = True
        det.udp_dstip = "127.0.0.1"  # resolves MAC addresses once (about 1 s)
        det.udp_srcip = "127.0.0.1"
        det.exptime = EXPTIME_S
        self.det = det
        return self

    def version(self) -> str:
        import slsdet

        return str(getattr(slsdet, "__version__", "") or self.det.packageversion)

    def send_to(self, port: int, receiver: SlsReceiverProcess | None = None) -> None:
        """Point the module at ``port``; ``receiver``: configure that ``slsReceiver`` for it (else none)."""
        det = self.det
        if receiver is not self.receiver:
            if self.receiver is not None:
                det.rx_hostname = "none"
            self.receiver = None
            self._dst_port = None
        if port != self._dst_port:
            det.udp_dstport = port
            self._dst_port = port
        if receiver is not None and self.receiver is None:
            det.rx_hostname = receiver.rx_hostname
            self.receiver = receiver

    def configure(self, frames: int, period_s: float) -> None:
        det = self.det
        det.frames = frames
        det.period = period_s

    def acquire(self, poll_s: float = 0.01, timeout: float | None = None) -> float:
        """Start (frame numbers from 1) and wait until the module is idle; returns the idle time."""
        import slsdet

        det = self.det
        det.startDetector()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = det.status
            status = status[0] if isinstance(status, list) else status
            if status in (slsdet.runStatus.IDLE, slsdet.runStatus.STOPPED):
                return time.monotonic()
            if status == slsdet.runStatus.ERROR:
                raise RuntimeError("the virtual Jungfrau reports ERROR")
            if deadline is not None and time.monotonic() > deadline:
                det.stopDetector()
                raise TimeoutError(f"the virtual Jungfrau is still {status.name} after {timeout:g} s")
            time.sleep(poll_s)

    def reset_frame_number(self) -> None:
        self.det.nextframenumber = 1

    def close(self) -> None:
        if self.det is not None:
            try:
                self.det.free()
            except RuntimeError as exc:
                log.warning("freeing slsdet shared memory failed: %s", exc)
            self.det = None
        self.server.cleanup()
        remove_client_shm(self.server.shm_id)


def configure_sls_output(det: Any, folder: Path, rcvbuf: int) -> int:
    """Binary files into ``folder``, socket buffer ``rcvbuf`` asked; returns what slsReceiver got."""
    import slsdet

    folder.mkdir(parents=True, exist_ok=True)
    det.fformat = slsdet.fileFormat.BINARY
    det.fpath = str(folder)
    det.fname = "run"
    det.findex = 0
    det.foverwrite = True
    det.fwrite = True
    det.rx_udpsocksize = rcvbuf
    real = det.rx_realudpsocksize
    return int(real[0] if isinstance(real, list) else real)


def scalar(value: Any) -> int:
    """slsdet answers per module: the value of our one module."""
    if isinstance(value, list):
        value = value[0]
        if isinstance(value, list):
            value = sum(value)
    return int(value)
