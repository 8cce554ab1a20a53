"""Give a VM's memory the cost it has on a bare-metal server, for the length of a benchmark.

Why: on this project's CI VM the first write to a guest page the host has not backed yet costs
~2.5-3 ms per MiB (a host-side fault per 4 KiB page), against ~0.33 ms per MiB for a page the guest
already uses; and the guest's *free page reporting* (virtio-balloon) hands freed pages back to the host
within seconds, so every benchmark run that writes gigabytes of HDF5 or binary files into /dev/shm pays
the fresh-page price again, whichever receiver writes them. On a beamline server (bare metal) that price
does not exist. :func:`backed_memory` switches page reporting off (the module parameter
``page_reporting_order`` raised above the largest page order, always restored afterwards, like
``net.core.rmem_max`` in ``_rmem``) and touches ``gib`` of tmpfs pages once, so the runs that follow
write into backed memory. Where the kernel has no page reporting it only pre-touches.

Measured with ``python benchmarks/_vmmem.py`` (prints both costs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _rmem import Setting, temporarily

log = logging.getLogger(__name__)

PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
STATE_PATH = Path("/tmp/std-daq-bench-page_reporting_order.json")
#: Above the largest buddy order (10 on x86-64): no free block is ever large enough to be reported.
REPORTING_OFF_ORDER = 11
CHUNK = 256 << 20


@dataclass(frozen=True)
class TouchResult:
    """What pre-touching cost: seconds per GiB of the first and of the last chunk, and in all."""

    gib: float
    seconds: float
    first_s_per_gib: float
    last_s_per_gib: float

    def describe(self) -> str:
        return (f"touched {self.gib:g} GiB of tmpfs pages in {self.seconds:.1f} s "
                f"(first {self.first_s_per_gib:.2f} s/GiB, last {self.last_s_per_gib:.2f} s/GiB)")


def page_reporting_setting() -> Setting:
    return Setting("page_reporting_order", PAGE_REPORTING_ORDER, STATE_PATH, 0, 64,
                   "run the benchmark as root, or pass --vm-memory as-is")


def touch(gib: float, directory: Path = Path("/dev/shm")) -> TouchResult:
    """Write ``gib`` of zeros into a tmpfs file and delete it: its pages are then used memory.

    (``posix_fallocate`` would not do: on tmpfs it reserves pages without writing them.)"""
    path = directory / f"std-daq-bench-touch-{os.getpid()}"
    zeros = bytes(CHUNK)
    rates: list[float] = []
    start = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        for _ in range(max(1, round(gib * (1 << 30) / CHUNK))):
            t = time.perf_counter()
            os.write(fd, zeros)
            rates.append((time.perf_counter() - t) * (1 << 30) / CHUNK)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return TouchResult(gib, time.perf_counter() - start, rates[0], rates[-1])


@contextlib.contextmanager
def backed_memory(gib: float, directory: Path = Path("/dev/shm")) -> Iterator[str]:
    """Within the block freed pages stay with the guest and ``gib`` of them have been touched.

    Yields a sentence for the results' machine facts."""
    if not PAGE_REPORTING_ORDER.exists():
        result = touch(gib, directory)
        log.info("no free page reporting on this machine; %s", result.describe())
        yield f"no free page reporting; {result.describe()}"
        return
    with temporarily(page_reporting_setting(), REPORTING_OFF_ORDER):
        result = touch(gib, directory)
        log.info("free page reporting off; %s", result.describe())
        yield f"free page reporting off (page_reporting_order {REPORTING_OFF_ORDER}), {result.describe()}"


def main() -> int:
    """Show the fresh-page and the backed-page cost: touch 4 GiB twice with reporting off."""
    logging.basicConfig(level="INFO", format="%(message)s")
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    with backed_memory(gib) as facts:
        print(facts)
        print("again:", touch(gib).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
