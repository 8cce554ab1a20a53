"""benchmarks/bench_dashboard.py runs: one tiny run per mode (no viewer, two viewers) writes its JSON and
Markdown, the viewers were served, and nothing is left in /dev/shm. Never asserts on timing or CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daq_backend.ram_buffer import SHM_DIR

REPO = Path(__file__).resolve().parents[2]


def shm_entries() -> set[str]:
    """What a run of the benchmark may create in /dev/shm (rings of ``bd...`` detectors, its workdir)."""
    return {p.name for pattern in ("std-daq-bd*", "bench-dashboard-*") for p in SHM_DIR.glob(pattern)}


def test_bench_dashboard_small_run(tmp_path: Path) -> None:
    before = shm_entries()
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_dashboard.py"), "--images", "20", "--rate", "20",
         "--repeats", "1", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "bench_dashboard.json").read_text())
    assert doc["schema"] == "std-daq-bench-dashboard/1"
    runs = {run["mode"]: run for run in doc["runs"]}
    assert set(runs) == {"no viewer", "2 viewers"}
    for run in runs.values():
        assert run["images"] == 20 and run["written"] + run["lost_frames"] >= 20
        assert set(run["cpu_s"]) == {"receiver-0", "assembler", "h5-writer", "writer-agent"}
        assert run["pipeline_cpu_ms_per_image"] > 0
    assert runs["no viewer"]["snapshots_received"] == []
    served = runs["2 viewers"]["snapshots_received"]
    assert len(served) == 2 and min(served) > 0
    markdown = (tmp_path / "bench_dashboard.md").read_text()
    assert "| no viewer | 1 |" in markdown and "| 2 viewers | 1 |" in markdown
    assert shm_entries() <= before
