"""Cost of placing one Jungfrau module (512 x 1024 = 0.5 Mpixel) into an image, as the assembler does
it (``JungfrauLayout.assemble``): raw, converted with each calibration layout, high-gain mode, and
with the inter-chip gap pixels inserted.

The frame has random 14-bit ADC values; ``--g1``/``--g2`` set the fraction of pixels in G1 and G2
(the conversion converts the whole module with G0 and recomputes only the other pixels, so the cost
grows with them). Each case runs ``--repeat`` times; the minimum (the least disturbed run on a shared
machine) and the median are printed in ms per module. Example::

    python benchmarks/bench_conversion.py --g1 0.03 --g2 0.01 --repeat 60
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from daq_backend.config import parse_config
from daq_backend.detectors import layout_for

ROWS, COLS = 512, 1024


def frame(rng: np.random.Generator, g1: float, g2: float) -> np.ndarray:
    """Raw uint16 pixels: gain code 1 for a fraction ``g1``, code 3 (G2) for ``g2``, else 0."""
    adc = rng.integers(0, 1 << 14, (ROWS, COLS), dtype=np.uint16)
    u = rng.random((ROWS, COLS))
    code = np.where(u < g2, 3, np.where(u < g1 + g2, 1, 0)).astype(np.uint16)
    return adc | code << 14


def timed(step: Callable[[], None], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, statistics.median(times) * 1e3


def cases(folder: Path, rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    with h5py.File(folder / "pedestal_gain.h5", "w") as f:
        f["pedestals"] = rng.uniform(1000, 3000, (3, ROWS, COLS)).astype(np.float32)
        f["gains"] = rng.uniform(0.01, 0.1, (3, ROWS, COLS)).astype(np.float32)
    with h5py.File(folder / "gains.h5", "w") as f:
        f["gains"] = rng.uniform(10, 100, (4, ROWS, COLS)).astype(np.float32)
    with h5py.File(folder / "pedestal.h5", "w") as f:
        f["gains"] = rng.uniform(1000, 3000, (4, ROWS, COLS)).astype(np.float32)
        f["pixel_mask"] = (rng.random((ROWS, COLS)) < 0.001).astype(np.uint32)
    jf_utils = {"gain_file": str(folder / "gains.h5"), "pedestal_file": str(folder / "pedestal.h5")}
    gaps = {"gap_pixels": True, "image_pixel_height": 514, "image_pixel_width": 1030}
    return {
        "raw": {},
        "raw, gap pixels": gaps,
        "pedestal_gain_file": {"pedestal_gain_file": str(folder / "pedestal_gain.h5")},
        "jungfrau_utils": jf_utils,
        "jungfrau_utils, high gain": {**jf_utils, "high_gain": True},
        "jungfrau_utils, gap pixels": {**jf_utils, **gaps},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--g1", type=float, default=0.03, help="fraction of pixels in G1")
    parser.add_argument("--g2", type=float, default=0.01, help="fraction of pixels in G2")
    parser.add_argument("--repeat", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="3 repeats: check that the script works")
    parser.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    parser.add_argument("--record", action="store_true",
                        help="also write benchmarks/records/bench_conversion.json and regenerate RESULTS.md")
    args = parser.parse_args(argv)
    from _records import Record, Table, command_line, machine_info, record_and_report

    started = machine_info()
    rows: list[list[str | int | float | None]] = []
    repeat = 3 if args.quick else args.repeat
    rng = np.random.default_rng(1)
    raw = frame(rng, args.g1, args.g2).reshape(-1).view(np.uint8)
    base = {"detector_name": "bench", "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
            "image_pixel_height": ROWS, "image_pixel_width": COLS, "start_udp_port": 50000}
    print(f"G1 {args.g1:.0%}, G2 {args.g2:.0%} of the pixels; ms per 0.5 Mpixel module, {repeat} runs")
    with tempfile.TemporaryDirectory() as folder:
        for name, fields in cases(Path(folder), rng).items():
            config = parse_config({**base, **fields})
            layout = layout_for(config)
            layout.prepare()
            image = np.zeros(config.image_shape, config.image_dtype)
            best, median = timed(partial(layout.assemble, 0, raw, image), repeat)
            print(f"{name:28s} min {best:6.2f}  median {median:6.2f}")
            rows.append([name, round(best, 3), round(median, 3)])
    if args.record:
        table = Table(f"Jungfrau conversion, ms per 0.5 Mpixel module, {repeat} runs",
                      ["case", "min ms", "median ms"], rows,
                      f"G1 {args.g1:.0%}, G2 {args.g2:.0%} of the pixels.")
        record_and_report(Record("bench_conversion", command_line("bench_conversion.py", argv),
                                 tables=[table], notes=list(args.note)), started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
