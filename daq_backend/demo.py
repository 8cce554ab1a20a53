"""``std-daq demo``: the whole DAQ on one laptop, driven by a real bluesky scan, checked end to end.

Starts, with no external service, exactly the processes ``std-daq up`` runs — UDP receivers,
assembler, h5 writer, writer agent and the REST API, under a supervisor in this process, on an
embedded broker hub — with the built-in UDP detector simulator as the detector, then runs
``bp.scan([det], motor, -1, 1, N)`` with an ``ophyd.sim`` motor and a ``StdDaqDetector`` that reaches
the DAQ through its REST API only. Afterwards it reads the images back *through the run's documents*
(StreamResource uri + dataset + StreamDatum indices), compares every pixel with the simulator's
pattern, validates every document against event-model's schemas, prints where the HDF5 file is and
what it holds, writes a PNG preview of one image, and exits non-zero if anything is off. Everything
it started is stopped before it returns.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="std-daq demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=5, help="scan points (default 5)")
    p.add_argument("--frames", type=int, default=4, help="images per point (default 4)")
    p.add_argument("--period", type=float, default=0.02, help="frame period in s (default 0.02)")
    p.add_argument("--detector", choices=("jungfrau", "eiger", "gigafrost"), default="jungfrau",
                   help="simulated detector type (default jungfrau, one 512x1024 module)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="folder for the HDF5 file and the PNG (default: a new temporary folder)")
    p.add_argument("--png", type=Path, default=None, help="preview file (default OUTPUT_DIR/preview.png)")
    p.add_argument("--broker-url", default=None,
                   help="amqp://... to use RabbitMQ instead of the embedded broker (default: embedded)")
    p.add_argument("--log-level", default="WARNING")
    return p


def _detector_config(kind: str) -> Any:
    from daq_backend.embedded import simulated_config

    if kind == "eiger":
        positions = {"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]}
        return simulated_config("eiger", 2, image_pixel_height=514, image_pixel_width=514,
                                module_positions=positions)
    if kind == "gigafrost":
        return simulated_config("gigafrost", 8, image_pixel_height=128, image_pixel_width=480)
    return simulated_config("jungfrau", 1)


def validate_documents(docs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Problems found by event-model's JSON schemas (empty: every document is valid)."""
    from event_model import DocumentNames, schema_validators

    problems = []
    for name, doc in docs:
        try:
            schema_validators[DocumentNames[name]].validate(doc)
        except Exception as exc:
            problems.append(f"{name} document invalid: {str(exc).splitlines()[0]}")
    return problems


def check_run(docs: Sequence[tuple[str, dict[str, Any]]], config: Any, points: int, frames: int) -> list[str]:
    """Everything the demo promises about the run, as a list of problems."""
    import h5py

    from daq_backend.simulator.pattern import expected_image
    from std_daq_ophyd.documents import uri_path
    from std_daq_ophyd.readback import stream_data

    problems = validate_documents(docs)
    stop = next((doc for name, doc in docs if name == "stop"), None)
    if stop is None or stop["exit_status"] != "success":
        problems.append(f"the run did not succeed: {stop and stop.get('reason')!r}")
    try:
        images = stream_data(docs, "det_image")
        status = stream_data(docs, "det_image_status")
    except (LookupError, OSError, KeyError, ValueError) as exc:
        return [*problems, f"the images cannot be found through the documents: {exc}"]
    h, w = config.image_shape
    if images.shape != (points, frames, h, w):
        problems.append(f"documents give images of shape {images.shape}, expected {(points, frames, h, w)}")
    if status.any():
        problems.append(f"{int(np.count_nonzero(status))} images are not good")
    paths = [uri_path(doc["uri"]) for name, doc in docs
             if name == "stream_resource" and doc["data_key"] == "det_image"]
    if len(paths) != 1:
        problems.append(f"expected one file, the documents reference {len(paths)}")
        return problems
    with h5py.File(paths[0], "r") as h5:
        data = h5["/entry/data/data"][:]
        ids = h5["/entry/data/image_id"][:]
        file_status = str(h5.attrs["status"])
    if file_status != "completed":
        problems.append(f"file status is {file_status!r}, expected 'completed'")
    if data.shape[0] != points * frames or not np.array_equal(images.reshape(data.shape), data):
        problems.append("the images found through the documents differ from the file's content")
    if len(ids) and not np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        problems.append(f"image ids are not consecutive: {ids.tolist()}")
    wrong = [int(i) for i, image in zip(ids, data, strict=True)
             if not np.array_equal(image, expected_image(config, int(i)))]
    if wrong:
        problems.append(f"{len(wrong)} images differ from the simulator's pattern (ids {wrong[:10]})")
    return problems


def demo_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.points < 1 or args.frames < 1 or args.period < 0:
        print("std-daq demo: --points and --frames must be >= 1, --period >= 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from daq_backend.embedded import LocalDaq

    output = args.output_dir or Path(tempfile.mkdtemp(prefix="std-daq-demo-"))
    output.mkdir(parents=True, exist_ok=True)
    config = _detector_config(args.detector)
    print(f"std-daq demo: simulated {args.detector} {config.image_pixel_height}x{config.image_pixel_width}, "
          f"{args.points} points x {args.frames} images, files in {output}")
    t0 = time.monotonic()
    daq = LocalDaq(config, broker_url=args.broker_url, log_level=args.log_level, output_roots=[output])
    try:
        daq.start(wait=False)  # the processes start while bluesky is imported here
        import bluesky.plans as bp
        import h5py
        from bluesky import RunEngine
        from bluesky.callbacks.best_effort import BestEffortCallback
        from ophyd.sim import SynAxis

        from daq_backend.stream.preview import render_png
        from std_daq_ophyd import StdDaqDetector
        from std_daq_ophyd.beamline import RunStore
        from std_daq_ophyd.readback import file_summary, format_summary

        daq.wait_ready()
        names = ", ".join(s.name for s in daq.supervisor.services)
        print(f"std-daq demo: DAQ up as {len(daq.supervisor.services)} processes ({names}); "
              f"REST API at {daq.url} (broker: {args.broker_url or 'embedded'})")
        det = StdDaqDetector(name="det", url=daq.url, output_dir=str(output))
        det.frames_per_trigger.put(args.frames)
        det.period.put(args.period)
        motor = SynAxis(name="motor")
        RE = RunEngine({})
        store = RunStore()
        RE.subscribe(store)
        bec = BestEffortCallback()
        bec.disable_plots()
        RE.subscribe(bec)
        RE(bp.scan([det], motor, -1, 1, args.points))
        docs = store.last
        problems = check_run(docs, config, args.points, args.frames)
        paths = store.files()
        print()
        for path in paths:
            summary = file_summary(path)
            print(format_summary(summary))
            png = args.png or output / "preview.png"
            with h5py.File(path, "r") as h5:
                image, image_id = h5["/entry/data/data"][0], int(h5["/entry/data/image_id"][0])
            render_png(image, png, title=f"std-daq demo: {Path(path).name}", image_id=image_id)
            print(f"preview:   {png}")
    except Exception as exc:
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
        print(f"std-daq demo: FAILED: {type(exc).__name__}: {exc}{cause}", file=sys.stderr)
        return 1
    finally:
        daq.stop()
    elapsed = time.monotonic() - t0
    if problems:
        print("\nstd-daq demo: FAILED checks:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"\nstd-daq demo: OK in {elapsed:.1f} s: documents valid, every pixel as the simulator sent it")
    return 0


def main() -> None:
    sys.exit(demo_main())


if __name__ == "__main__":
    main()
