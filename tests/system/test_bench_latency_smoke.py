"""benchmarks/bench_latency.py: its pure statistics, and one tiny end-to-end run of the script (both phases,
a few dozen images) checking it runs, writes its JSON/Markdown/PNG with the expected structure and leaves no
file or shared memory behind. Never asserts on timing: the machine is shared."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_latency  # noqa: E402

PIPELINE = ("receiver-0", "assembler", "writer-agent", "h5-writer")


# -- statistics ---------------------------------------------------------------------------------------


def test_latency_figures_and_empty_input() -> None:
    figures = bench_latency.latency_figures(list(range(1, 101)))
    assert figures["n"] == 100
    assert figures["p50"] == pytest.approx(50.5)
    assert figures["p99"] == pytest.approx(99.01)
    assert figures["max"] == 100
    empty = bench_latency.latency_figures([])
    assert empty["n"] == 0 and math.isnan(empty["p99"])


def test_latencies_are_matched_by_image_id() -> None:
    stamps = np.array([10.0, 10.01, 10.02, 10.03])  # images 5..8 sent
    ids = np.array([5, 6, 6, 8, 99, 7])  # a duplicate, a foreign id, 7 not good
    status = np.array([0, 0, 0, 0, 0, 1])
    visible = np.array([10.002, 10.013, 10.02, 10.034, 10.04, 10.05])
    error = np.full(6, 0.001)
    matched = bench_latency.match_latencies(5, stamps, ids, status, visible, error)
    assert matched["ids"].tolist() == [5, 6, 8]
    assert matched["latency_ms"] == pytest.approx([2.0, 3.0, 4.0])
    assert matched["error_ms"] == pytest.approx([1.0, 1.0, 1.0])
    assert (matched["good"], matched["not_good"], matched["foreign_rows"], matched["duplicate_rows"]) == \
        (3, 1, 1, 1)


def test_rss_fit_skips_the_warm_up_and_gives_the_slope_per_10k_images() -> None:
    images = np.arange(0, 100_001, 1000)
    rss = (100 + 0.5 * images / 10_000) * bench_latency.MIB
    rss[:5] += 500 * bench_latency.MIB  # a warm-up peak
    fit = bench_latency.rss_fit(images, rss, warmup_images=5000)
    assert fit["slope_per_10k"] == pytest.approx(0.5)
    assert fit["start"] == pytest.approx(100.25)
    assert fit["end"] == pytest.approx(105.0)
    assert fit["max"] == pytest.approx(600.2)
    assert fit["samples"] == 96
    short = bench_latency.rss_fit([0, 10], [1, 2], warmup_images=5)
    assert short["samples"] == 1 and math.isnan(short["slope_per_10k"])


def test_memory_verdict() -> None:
    def private(slope: float) -> dict:
        return {"slope_per_10k": slope}

    assert bench_latency.memory_verdict(private(0.2), 900.0, 1000.0, 1.0) == "flat"
    assert bench_latency.memory_verdict(private(-3.0), 0.0, 1000.0, 1.0) == "flat"
    assert bench_latency.memory_verdict(private(1.5), 0.0, 1000.0, 1.0) == "GROWING"
    assert bench_latency.memory_verdict(private(0.2), 1100.0, 1000.0, 1.0).startswith("GROWING")
    assert bench_latency.memory_verdict(private(math.nan), 0.0, 1000.0, 1.0) == "too few samples"


def test_bad_arguments_are_refused() -> None:
    parser = bench_latency.build_parser()
    for argv in (["--latency-rate", "0"], ["--rss-images", "-5"], ["--segment-images", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    with pytest.raises(SystemExit, match="nothing to do"):
        bench_latency.main(["--skip-latency", "--skip-rss"])


# -- one tiny run --------------------------------------------------------------------------------------


def test_tiny_run_writes_its_report_and_cleans_up(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, str(BENCH_DIR / "bench_latency.py"),
            "--latency-images", "40", "--latency-rate", "100", "--warmup-images", "10",
            "--rss-images", "80", "--rss-rate", "200", "--segment-images", "20", "--ring-slots", "16",
            "--rss-interval", "0.1", "--settle", "2", "--workdir", str(work), "--out", str(out),
            "--log-level", "WARNING"]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## Latency" in proc.stdout and "## Memory" in proc.stdout

    doc = json.loads((out / "bench_latency.json").read_text())
    assert doc["schema"] == bench_latency.SCHEMA
    assert {"cpu_model", "nproc", "memory_gb", "kernel", "python", "date"} <= set(doc["machine"])

    lat = doc["latency"]
    assert lat["status"] == "done", lat
    assert lat["images"] == 40 and len(lat["segments"]) == 2
    assert {"p50", "p90", "p99", "max", "n"} <= set(lat["latency_ms"])
    assert lat["latency_ms"]["n"] == sum(len(s["latency_ms"]) for s in lat["segments"]) <= lat["good"]
    assert lat["good"] + lat["lost"] == 40
    assert {"median", "max"} <= set(lat["error_ms"])
    assert isinstance(lat["target_met"], bool)

    rss = doc["rss"]
    assert rss["status"] == "done", rss
    assert rss["requests"] == 4 and rss["totals"]["sent"] == 80
    assert set(PIPELINE) <= set(rss["processes"])
    for name in PIPELINE:
        p = rss["processes"][name]
        assert p["pipeline"] and p["verdict"]
        assert {"start", "end", "max", "slope_per_10k", "samples"} <= set(p["rss"]) == set(p["private"])
        assert len(p["series_images"]) == len(p["series_rss_mib"]) == len(p["series_private_mib"]) > 0
    assert not rss["processes"]["harness"]["pipeline"]

    markdown = (out / "bench_latency.md").read_text()
    assert "| h5-writer |" in markdown and "p99 ms" in markdown
    assert (out / "bench_latency.png").stat().st_size > 10_000

    # what --record keeps: the document without its long series still renders, and the headline rows
    from _records import compact

    assert "| h5-writer |" in bench_latency.render_markdown(compact(doc, max_items=10))
    rows = bench_latency.headline(doc)
    assert len(rows) == 2 and rows[0][0].startswith("latency, last packet")
    assert rows[1][0].startswith("RSS of every pipeline process over 80 images")

    # nothing left behind: files, rings
    assert list(work.iterdir()) == []
    for detector in (lat["detector"], rss["detector"]):
        assert not list(Path("/dev/shm").glob(f"std-daq-{detector}-*"))
