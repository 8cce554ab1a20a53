"""The pipeline statistics the REST API answers ``/stats`` with, from the supervisor's status.

:func:`status_file_stats` reads the status file the supervisor (``std-daq up``) keeps for a detector;
:func:`summarize_stats` turns such a status (``Supervisor.status()`` shape, or None while no
supervisor runs) into the summary: images/s and bytes/s of readout and writer, the receivers' packet
rates, rejected and lost counts, and each process's counters and rates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from daq_backend import ipc
from daq_backend.config import DetectorConfig

#: returns the supervisor's status now, or None while there is none
StatsProvider = Callable[[], Mapping[str, Any] | None]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def status_file_stats(detector_name: str) -> StatsProvider:
    """Read the supervisor's status file (``std-daq up``); None while no supervisor runs."""
    from daq_backend.supervisor import read_status

    path = Path(ipc.status_file(detector_name))

    def provider() -> Mapping[str, Any] | None:
        try:
            return read_status(path)
        except (OSError, ValueError):
            return None

    return provider


def summarize_stats(status: Mapping[str, Any] | None, config: DetectorConfig) -> dict[str, Any]:
    """Rates and losses of the pipeline from a supervisor status (``Supervisor.status()`` shape)."""
    if status is None:
        pipeline = "down"
        services: list[Mapping[str, Any]] = []
    else:
        pipeline = "stale" if status.get("stale") else "up"
        services = [s for s in status.get("services", []) if isinstance(s, Mapping)]
    image_nbytes = config.image_nbytes

    def rate(svc: Mapping[str, Any], key: str) -> float:
        value = (svc.get("rates") or {}).get(key, 0.0)
        return float(value) if isinstance(value, int | float) else 0.0

    def count(svc: Mapping[str, Any], key: str) -> int:
        value = (svc.get("counters") or {}).get(key, 0)
        return int(value) if isinstance(value, int | float) else 0

    def stream(group: list[Mapping[str, Any]]) -> dict[str, float]:
        images = sum(rate(s, "images") for s in group)
        nbytes = sum(rate(s, "bytes") for s in group) or images * image_nbytes
        return {"images_per_second": images, "bytes_per_second": nbytes}

    name = lambda s: str(s.get("name", ""))  # noqa: E731
    receivers = [s for s in services if name(s).startswith("receiver")]
    assemblers = [s for s in services if name(s).startswith(("assembler", "stream-recv"))]
    writers = [s for s in services if "writer" in name(s)]
    lost_from = receivers or assemblers
    return {
        "pipeline": pipeline,
        "updated": None if status is None else _float(status.get("updated")),
        "detector": stream(assemblers),
        "writer": stream(writers),
        "receivers": {
            "packets_per_second": sum(rate(s, "packets") for s in receivers),
            "bytes_per_second": sum(rate(s, "bytes") for s in receivers),
        },
        "rejected": {
            "bad_datagrams": sum(count(s, "bad_datagrams") for s in receivers),
            "module_id": sum(count(s, "rejected_module_id") for s in receivers),
            "out_of_range": sum(count(s, "rejected_out_of_range") for s in receivers),
            "out_of_window": sum(count(s, "rejected_out_of_window") for s in receivers),
        },
        "lost": {
            "packets": sum(count(s, "missing_packets") for s in lost_from),
            "frames_incomplete": sum(count(s, "frames_incomplete") for s in receivers),
            "images_missing_packets": sum(count(s, "images_missing_packets") for s in assemblers),
            "images_id_mismatch": sum(count(s, "images_id_mismatch") for s in assemblers),
            "missing_module_frames": sum(count(s, "missing_module_frames") for s in assemblers),
        },
        "processes": {
            name(s): {
                "pid": _int(s.get("pid")),
                "alive": s.get("alive") if isinstance(s.get("alive"), bool) else None,
                "restarts": _int(s.get("restarts")) or 0,
                "failed": str(s["failed"]) if s.get("failed") else None,
                "counters": dict(s.get("counters") or {}),
                "rates": {
                    k: float(v) for k, v in (s.get("rates") or {}).items() if isinstance(v, int | float)
                },
            }
            for s in services
        },
    }
