"""Plans for std-daq detectors that bluesky does not ship, and a run summary for the profile."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import Msg

from std_daq_ophyd.detector import IMAGE_DATASET
from std_daq_ophyd.readback import Docs, file_summary, format_summary


def fly(detector: Any, stream_name: str | None = None, flush_period: float = 0.5,
        md: dict[str, Any] | None = None) -> Generator[Msg, Any, Any]:
    """One continuous acquisition of ``frames_per_trigger * triggers`` images (kickoff / complete),
    its images collected into stream ``stream_name`` (default ``<name>_stream``) while it runs."""
    stream = stream_name or f"{detector.name}_stream"
    metadata = {"plan_name": "fly", "detectors": [detector.name], **(md or {})}

    @bpp.stage_decorator([detector])
    @bpp.run_decorator(md=metadata)
    def inner() -> Generator[Msg, Any, Any]:
        yield from bps.declare_stream(detector, name=stream, collect=True)
        yield from bps.kickoff(detector, wait=True)
        yield from bps.collect_while_completing([detector], [detector], flush_period=flush_period,
                                                stream_name=stream)

    return (yield from inner())


def summarize(docs: Docs) -> None:
    """Print a summary of every detector file a run's documents reference."""
    from std_daq_ophyd.documents import uri_path

    images = [doc for name, doc in docs if name == "stream_resource"
              and doc["parameters"]["dataset"] == IMAGE_DATASET]
    paths = list(dict.fromkeys(uri_path(doc["uri"]) for doc in images))
    text = "\n\n".join(format_summary(file_summary(p)) for p in paths) or "no files referenced"
    print(text)
