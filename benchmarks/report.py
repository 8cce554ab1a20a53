"""Regenerate ``benchmarks/RESULTS.md`` and the README's benchmark table from ``benchmarks/records/``.

The records (one JSON per benchmark, written by each script's ``--record``) are the only input: no
figure is typed by hand. A benchmark without a record is listed as *not re-measured*. The README
table sits between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``; the rest of the
README is left alone. ``tests/system/test_benchmarks_smoke.py`` fails when either file differs from what this
script writes, so a hand edit cannot pass CI.

    python benchmarks/report.py            # rewrite RESULTS.md and the README table
    python benchmarks/report.py --check    # exit 1 (and say which) when they are not up to date
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from _records import RECORDS_DIR, Record, Table, load_records  # noqa: E402

REPO = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "RESULTS.md"
README_FILE = REPO / "README.md"
TABLE_START = "<!-- bench-table:start -->"
TABLE_END = "<!-- bench-table:end -->"

#: Every benchmark script, in report order: (title, what it measures). A script without a record
#: appears under "Not re-measured".
BENCHES: dict[str, tuple[str, str]] = {
    "bench_sender": (
        "Simulator ceiling (`bench_sender.py`)",
        "How fast the built-in simulator sends, free-running, with nothing else running (*unread* sink) "
        "and with a C drain receiving on the same cores (*drained*). Every multi-module figure of the "
        "pipeline benchmark is shown beside this ceiling, measured again in that run.",
    ),
    "bench_pipeline": (
        "Pipeline: ours vs slsReceiver (`bench_pipeline.py`)",
        "The virtual Jungfrau (slsDetectorPackage's virtual server, 1 module) feeds a C drain (the "
        "loopback limit), slsReceiver and our pipeline in turn, in one run; then the built-in simulator "
        "feeds our pipeline for the multi-module detectors, stepped up until frames are lost.",
    ),
    "bench_latency": ("Latency and memory (`bench_latency.py`)",
                      "Last packet sent -> chunk readable in the HDF5 file; RSS of every process over a "
                      "long run."),
    "bench_readout": ("Readout (`bench_readout.py`)", "UDP -> receiver -> sync/assembler -> image ring."),
    "bench_writer": ("HDF5 writer (`bench_writer.py`)", "The h5 writer against h5py loops."),
    "bench_stream": ("Buffer replication (`bench_stream.py`)", "stream-send -> TCP -> stream-recv."),
    "bench_epics_buffer": ("EPICS buffer (`bench_epics_buffer.py`)", "caproto monitors -> Redis streams."),
    "bench_receiver_cpu": ("Receiver CPU per packet (`bench_receiver_cpu.py`)",
                           "One receiver process, recvmmsg batches vs one recv per packet."),
    "bench_dashboard": ("Dashboard cost (`bench_dashboard.py`)", "Pipeline CPU with and without viewers."),
    "bench_conversion": ("Jungfrau conversion (`bench_conversion.py`)", "Pedestal/gain conversion speed."),
}


# -- tables ------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1000 or value == int(value) else f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_table(table: Table, level: str = "###") -> list[str]:
    lines = [f"{level} {table.title}", ""]
    if table.caption:
        lines += [table.caption, ""]
    lines += ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return [*lines, ""]


def provenance(record: Record) -> list[str]:
    """Command, commit, date and machine of a record, as the report shows them."""
    m = record.machine
    commit = record.commit + (" (with uncommitted changes)" if record.dirty else "")
    load = f"load average {m.get('loadavg_start', '?')} at start, {m.get('loadavg_end', '?')} at end"
    return [
        f"Command: `{record.command}`", "",
        f"Commit `{commit}`, {record.date}; {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
        f"kernel {m.get('kernel', '?')}, Python {m.get('python', '?')}; {load}.", "",
    ]


# -- per-bench sections ------------------------------------------------------------------------------


def _pipeline_section(record: Record) -> list[str]:
    from _report import render_markdown

    assert record.raw is not None, "bench_pipeline records carry the run document"
    body = render_markdown(record.raw)
    body = re.sub(r"^# Pipeline benchmark.*\n\nCommand: `[^`]*`\n\n", "", body)
    body = re.sub(r"^(#+) ", lambda mo: "#" * (len(mo.group(1)) + 1) + " ", body, flags=re.MULTILINE)
    lines = body.rstrip("\n").splitlines()
    plot = f"{record.bench}.png"
    if (BENCH_DIR / plot).exists():
        lines += ["", f"![rate and loss versus requested rate]({plot})"]
    return [*lines, ""]


def _dashboard_section(record: Record) -> list[str]:
    from bench_dashboard import render_markdown

    assert record.raw is not None, "bench_dashboard records carry the run document"
    body = render_markdown(record.raw)
    body = re.sub(r"^## Dashboard cost.*\n\nCommand: `[^`]*`\n\n", "", body)
    return [*body.rstrip("\n").splitlines(), ""]


def _latency_section(record: Record) -> list[str]:
    from bench_latency import render_markdown

    assert record.raw is not None, "bench_latency records carry the run document"
    body = render_markdown(record.raw)
    body = re.sub(r"^# Latency and memory benchmark.*\n\nCommand: `[^`]*`\n\n", "", body)
    body = re.sub(r"^(#+) ", lambda mo: "#" * (len(mo.group(1)) + 1) + " ", body, flags=re.MULTILINE)
    return [*body.rstrip("\n").splitlines(), ""]


SECTIONS: dict[str, Callable[[Record], list[str]]] = {
    "bench_pipeline": _pipeline_section,
    "bench_latency": _latency_section,
    "bench_dashboard": _dashboard_section,
}


def script_of(bench: str) -> str:
    """The script a record name belongs to: ``bench_pipeline_asis`` (``--record-as``) -> bench_pipeline."""
    return max((b for b in BENCHES if bench == b or bench.startswith(b + "_")), key=len, default=bench)


def bench_section(record: Record) -> list[str]:
    script = script_of(record.bench)
    title, what = BENCHES.get(script, (record.bench, ""))
    if script != record.bench:
        title = f"{title}: record `{record.bench}`"
    lines = [f"## {title}", "", what, "", *provenance(record)]
    if record.notes:
        lines += [f"- {n}" for n in record.notes] + [""]
    if script in SECTIONS:
        lines += SECTIONS[script](record)
    for table in record.tables:
        lines += render_table(table)
    return lines


# -- headline rows (README table and RESULTS summary) ------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One headline figure: what, ours, the peer or reference, the record it comes from; ``readme``
    False keeps it out of the README's shorter table (RESULTS.md's summary has every row)."""

    what: str
    ours: str
    peer: str
    bench: str
    readme: bool = True


def _sender_rows(record: Record) -> list[Row]:
    rows: list[Row] = []
    points = (record.raw or {}).get("points", [])
    for p in points:
        if p["sink"] != "unread" or p["batch"] != "default" or p.get("processes", 1) != 1:
            continue
        one = next((q for q in points if q["detector"] == p["detector"] and q["sink"] == "unread"
                    and q["batch"] == "1" and q.get("processes", 1) == 1), None)
        several = next((q for q in points if q["detector"] == p["detector"] and q["sink"] == "unread"
                        and q["batch"] == "default" and q.get("processes", 1) > 1), None)
        ours = (f"{p['cpu_us_per_image']:.0f} CPU µs/image = {1e6 / p['cpu_us_per_image']:.0f} images/s per "
                f"busy core; achieved {p['images_per_s']:.0f} images/s, {p['packets_per_s']:.0f} packets/s, "
                f"{p['gbps']:.2f} GB/s")
        peer = (f"one image per call: {one['cpu_us_per_image']:.0f} CPU µs/image, achieved "
                f"{one['images_per_s']:.0f} images/s" if one else "–")
        if several:
            peer += (f"; {several['processes']} processes: achieved {several['images_per_s']:.0f} images/s "
                     f"({several['cpu_us_per_image']:.0f} CPU µs/image)")
        ports = f"{p['modules']} port" + ("s" if p["modules"] != 1 else "")
        rows.append(Row(f"simulator ceiling, {p['detector']} ({ports}), free-running, nothing receiving",
                        ours, peer, "bench_sender"))
    return rows


def _pipeline_rows(record: Record) -> list[Row]:
    from _report import RunResult, rate_label, ratios, summarize

    doc = record.raw or {}
    runs = [RunResult.from_dict(r) for r in doc.get("runs", [])]
    rows: list[Row] = []
    vm = str(doc.get("machine", {}).get("vm_memory", ""))
    memory = ", VM memory as-is" if vm.startswith("as the machine") else ", VM memory backed" if vm else ""
    jf = [r for r in runs if r.case == "jungfrau" and r.error is None]
    ours = [r for r in jf if r.variant == "ours"]
    sls = [r for r in jf if r.variant == "slsReceiver"]
    if ours or sls:
        points = len({(r.requested_rate_hz, r.sustained, r.buffer) for r in jf})
        repeats = max(r.repeat for r in jf) + 1
        rows.append(Row(
            f"lost frames, virtual Jungfrau, {points} points × {repeats} repeat(s){memory}",
            f"{sum(r.lost for r in ours)} of {sum(r.frames for r in ours)} in {len(ours)} runs",
            f"slsReceiver {sum(r.lost for r in sls)} of {sum(r.frames for r in sls)} in {len(sls)} runs",
            "bench_pipeline"))
    for r in ratios(summarize(runs)):
        if r["case"] != "jungfrau":
            continue
        label = rate_label(r["requested_rate_hz"], r["sustained"])
        rows.append(Row(
            f"CPU ms/frame, {label}, {r['buffer']} buffer{memory} (sent/s ours / sls: "
            f"{r.get('ours_sent_hz', 0):.0f} / {r.get('sls_sent_hz', 0):.0f})",
            f"{r['ours_cpu_ms']:.3f}, ratio {_ratio(r['cpu_ratio'])} (whole-process "
            f"{_ratio(r.get('whole_cpu_ratio'))})",
            f"slsReceiver {r['sls_cpu_ms']:.3f}", "bench_pipeline"))
    base = doc.get("baseline", {})
    for r in ratios(summarize(runs), "baseline"):
        if r["case"] != "jungfrau":
            continue
        label = rate_label(r["requested_rate_hz"], r["sustained"])
        rows.append(Row(
            f"CPU ms/frame, {label}, {r['buffer']} buffer, against our pipeline at {base.get('rev', '?')} "
            f"(`{base.get('commit', '?')}`)",
            f"{r['ours_cpu_ms']:.3f}, ratio {_ratio(r['cpu_ratio'])}",
            f"baseline {r['sls_cpu_ms']:.3f} (sent/s {r['ours_sent_hz']:.0f} / {r['sls_sent_hz']:.0f})",
            "bench_pipeline", readme=False))
    for m in doc.get("multi", []):
        best = m.get("best")
        ceiling = m.get("sender_ceiling_hz")
        ceiling_text = f"sender ceiling {ceiling:.0f}/s" if ceiling else "sender ceiling not measured"
        ours_text = (f"lossless to {best['send_rate_hz']:.0f} images/s ({best['gbps']:.2f} GB/s, "
                     f"{best['cpu_ms_per_frame']:.2f} CPU ms/image)" if best else "no lossless step")
        rows.append(Row(f"{m['detector']} ({m['modules']} modules, {m['image']}), built-in simulator, "
                        f"{m['buffer']} buffer", f"{ours_text}; {m.get('stopped_because', '')}", ceiling_text,
                        "bench_pipeline"))
    return rows


def _ratio(value: float | None) -> str:
    from _report import fmt_ratio

    return fmt_ratio(value)


def _table_rows(record: Record) -> list[Row]:
    """A record's own ``headline`` figures: ``figures["headline"]`` = [[what, ours, peer], ...]."""
    return [Row(str(w), str(o), str(p), record.bench) for w, o, p in record.figures.get("headline", [])]


HEADLINES: dict[str, Callable[[Record], list[Row]]] = {
    "bench_sender": _sender_rows,
    "bench_pipeline": _pipeline_rows,
}


def headline_rows(records: dict[str, Record]) -> list[Row]:
    rows: list[Row] = []
    for bench in BENCHES:
        if bench in records:
            rows += HEADLINES.get(bench, _table_rows)(records[bench])
    for bench in sorted(set(records) - set(BENCHES)):
        rows += HEADLINES.get(script_of(bench), _table_rows)(records[bench])
    return rows


def headline_table(records: dict[str, Record], link: str, readme: bool = False) -> list[str]:
    lines = ["| what | ours | peer / reference | record |", "|---|---|---|---|"]
    for row in headline_rows(records):
        if readme and not row.readme:
            continue
        r = records[row.bench]
        lines.append(f"| {_cell(row.what)} | {_cell(row.ours)} | {_cell(row.peer)} | "
                     f"[{row.bench}]({link}{row.bench}.json) `{r.commit}` {r.date[:10]} |")
    missing = [b for b in BENCHES if b not in records]
    if missing:
        lines += ["", "Not re-measured since the records were introduced: "
                  + ", ".join(f"`{b}.py`" for b in missing) + "."]
    return lines


# -- whole files -------------------------------------------------------------------------------------


def render_results(records: dict[str, Record]) -> str:
    lines = [
        "# Benchmark results", "",
        "<!-- generated by benchmarks/report.py from benchmarks/records/*.json; do not edit by hand -->", "",
        "Every figure on this page is written by a benchmark script: `--record` stores the command, the "
        "commit, the machine and the figures in `benchmarks/records/<bench>.json` (committed), and "
        "`python benchmarks/report.py` renders this page and the README's table from those files alone "
        "(a test fails when either differs from what it writes). The machine's two cores are shared by "
        "sender, pipeline and peer, so comparisons are made inside one run; a record's load average says "
        "how busy the machine was.", "",
        "How to read the figures: CPU per frame is compared where both receivers ran at the same achieved "
        "rate; a free-running row is paced by the sender beside each receiver (its *written/s* is the "
        "sender's rate, not the receiver's capacity); a highest lossless rate is shown beside the sender's "
        "ceiling, and a step the sender could not reach measured the sender.", "",
        "## Summary", "",
        *headline_table(records, "records/"), "",
    ]
    missing = [b for b in BENCHES if b not in records]
    if missing:
        lines += ["## Not re-measured", "",
                  "These benchmarks have no record yet; the figures this page used to show for them were "
                  "typed by hand and have been removed. Run them with `--record` to bring them back:", ""]
        lines += [f"- {BENCHES[b][0]}: {BENCHES[b][1]}" for b in missing] + [""]
    for bench in BENCHES:
        if bench in records:
            lines += bench_section(records[bench])
    for bench in sorted(set(records) - set(BENCHES)):
        lines += bench_section(records[bench])
    return "\n".join(lines).rstrip("\n") + "\n"


def render_readme_table(records: dict[str, Record]) -> str:
    return "\n".join([TABLE_START, *headline_table(records, "benchmarks/records/", readme=True),
                      "", "More rows (e.g. against a baseline revision) and every table: "
                      "[benchmarks/RESULTS.md](benchmarks/RESULTS.md).", TABLE_END])


def replace_readme_table(readme: str, table: str) -> str:
    if TABLE_START not in readme or TABLE_END not in readme:
        raise ValueError(f"the README has no {TABLE_START} ... {TABLE_END} markers")
    head, rest = readme.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return head + table + tail


def outputs(records_dir: Path = RECORDS_DIR, readme: Path = README_FILE) -> dict[Path, str]:
    """What RESULTS.md and the README must contain, from the records in ``records_dir``."""
    records = load_records(records_dir)
    return {
        RESULTS_FILE: render_results(records),
        readme: replace_readme_table(readme.read_text(), render_readme_table(records)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.read_text() != text if path.exists() else True:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print("not what benchmarks/report.py writes: " + ", ".join(str(s) for s in stale), file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
