"""UDP detector simulator: Jungfrau, Eiger and GigaFRoST packets with a predictable pixel pattern.

``pattern`` says what every pixel of every image is (and what the pipeline must produce),
``sender`` sends it over UDP at a precise rate with optional faults, ``udp`` is the batched
zero-copy ``sendmmsg`` transport underneath. (``DetectorSimulator`` lives in ``sender`` and is not
imported here so ``python -m daq_backend.simulator.sender`` runs cleanly.)
"""

from __future__ import annotations

from daq_backend.simulator.pattern import (
    PatternSource,
    expected_image,
    header_ids,
    module_datagrams,
    module_frame_bytes,
    pattern_source,
)

__all__ = [
    "PatternSource",
    "expected_image",
    "header_ids",
    "module_datagrams",
    "module_frame_bytes",
    "pattern_source",
]
