"""Benchmark results: the per-run record, the noise summary (min/median/max over repeats), the ratios
ours / slsReceiver, machine facts, and the Markdown/JSON output.

Why separate from the runner: everything here is pure (records in, text out), so it is tested without
any detector, and the plot and a later re-rendering read the same JSON the run wrote.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "std-daq-bench-pipeline/1"
VARIANTS = ("drain", "slsReceiver", "ours")
#: ``--baseline REV``: our pipeline at another revision, run by that revision's own benchmark
BASELINE = "baseline"
ALL_VARIANTS = (*VARIANTS, BASELINE)
#: Processes counted as "receive + write" per variant (the sender is reported on its own).
SENDER_PROCS = ("vserver", "simulator")
NON_PIPELINE_PROCS = (*SENDER_PROCS, "vserver-stop", "harness")


@dataclass
class RunResult:
    """One variant at one point, one repeat. Frame counts are per detector image."""

    case: str  # "jungfrau" (virtual Jungfrau) or "multi:<detector>" (built-in simulator)
    variant: str  # drain | slsReceiver | ours
    buffer: str  # default | large
    rmem_max: int
    requested_rate_hz: float  # 0 = free running
    frames: int  # frames the sender was asked to send
    repeat: int = 0
    period_ms: float | None = None
    sustained: bool = False
    frame_bytes: int = 0
    send_wall_s: float = 0.0
    send_rate_hz: float = 0.0
    caught: int | None = None  # frames of which at least one packet arrived
    written: int | None = None  # frames in the output (drain: None)
    good: int = 0  # complete frames delivered (output, or received for the drain)
    missing_packets: int | None = None
    kernel_drops: int | None = None  # datagrams the kernel dropped on the receiving socket(s)
    rcvbuf: int | None = None  # kernel sk_rcvbuf of the receiving socket (ss "rb"; twice the usable size)
    wall_s: float = 0.0  # sender start -> last frame written (drain: last packet)
    procs: dict[str, dict[str, float | int]] = field(default_factory=dict)
    foreign_cpu_s: float = 0.0  # CPU used by other programs on the machine during the run
    sender_slips: int = 0  # built-in simulator: schedule restarts (it fell behind, e.g. descheduled)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def lost(self) -> int:
        return max(0, self.frames - self.good)

    @property
    def lost_pct(self) -> float:
        return 100.0 * self.lost / self.frames if self.frames else 0.0

    @property
    def wall_rate_hz(self) -> float:
        return self.good / self.wall_s if self.wall_s > 0 else 0.0

    def cpu_s(self, names: Iterable[str]) -> float:
        return sum(float(self.procs[n]["cpu_s"]) for n in names if n in self.procs)

    @property
    def pipeline_procs(self) -> list[str]:
        return [n for n in self.procs if n not in NON_PIPELINE_PROCS]

    @property
    def cpu_ms_per_frame(self) -> float:
        """Receive + write CPU per frame the receiver caught (frames lost in the kernel cost nothing)."""
        per = self.caught if self.caught else self.frames
        return 1000.0 * self.cpu_s(self.pipeline_procs) / per if per else 0.0

    @property
    def whole_cpu_ms_per_frame(self) -> float:
        """Like :attr:`cpu_ms_per_frame` plus the harness process: for ours it hosts the supervisor
        and the embedded broker hub (part of the pipeline), for both it also runs the benchmark's
        process monitor, so this is an upper bound on "every process and thread" of each variant."""
        per = self.caught if self.caught else self.frames
        return 1000.0 * self.cpu_s([*self.pipeline_procs, "harness"]) / per if per else 0.0

    @property
    def sender_cpu_ms_per_frame(self) -> float:
        return 1000.0 * self.cpu_s(SENDER_PROCS) / self.frames if self.frames else 0.0

    @property
    def cores_per_gbps(self) -> float:
        """Receive + write CPU seconds per GB delivered = cores needed per GB/s (sizing rule: <= 1)."""
        gigabytes = self.good * self.frame_bytes / 1e9
        return self.cpu_s(self.pipeline_procs) / gigabytes if gigabytes > 0 else 0.0

    @property
    def rss_max_mb(self) -> float:
        values = [int(self.procs[n]["rss_max"]) for n in self.pipeline_procs]
        return max(values) / 1e6 if values else 0.0

    def key(self) -> tuple[str, float, bool, str, str]:
        return (self.case, self.requested_rate_hz, self.sustained, self.buffer, self.variant)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(lost=self.lost, lost_pct=round(self.lost_pct, 4),
                    wall_rate_hz=round(self.wall_rate_hz, 2),
                    cpu_ms_per_frame=round(self.cpu_ms_per_frame, 4),
                    whole_cpu_ms_per_frame=round(self.whole_cpu_ms_per_frame, 4),
                    sender_cpu_ms_per_frame=round(self.sender_cpu_ms_per_frame, 4),
                    cores_per_gbps=round(self.cores_per_gbps, 4))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class SenderReport:
    """What the simulator wrapper prints: images sent and its monotonic start/end (CLOCK_MONOTONIC is
    system-wide, so they compare with this process' ``time.monotonic()``)."""

    sent: int
    start: float
    end: float
    #: times the simulator fell behind its schedule by more than its catch-up window and restarted it
    slips: int = 0

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


def parse_sender_report(text: str) -> SenderReport:
    """The last JSON line of the simulator wrapper's output (everything else is its log)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
                return SenderReport(int(data["sent"]), float(data["start"]), float(data["end"]),
                                    int(data.get("slips", 0)))
            except (ValueError, KeyError, TypeError):
                continue
    raise ValueError(f"no sender report in the simulator output: {text.strip()[-300:]!r}")


# -- statistics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """min / median / max of one metric over the repeats of a point."""

    lo: float
    med: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(min(values), statistics.median(values), max(values), len(values))

    def fmt(self, digits: int = 1) -> str:
        if self.n == 0:
            return "–"
        med = f"{self.med:.{digits}f}"
        if self.n == 1 or self.lo == self.hi:
            return med
        return f"{med} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"

    def to_dict(self) -> dict[str, float | int]:
        return {"min": self.lo, "median": self.med, "max": self.hi, "n": self.n}


METRICS: dict[str, str] = {
    "send_rate_hz": "send_rate_hz",
    "lost_pct": "lost_pct",
    "lost": "lost",
    "good": "good",
    "wall_rate_hz": "wall_rate_hz",
    "cpu_ms_per_frame": "cpu_ms_per_frame",
    "whole_cpu_ms_per_frame": "whole_cpu_ms_per_frame",
    "sender_cpu_ms_per_frame": "sender_cpu_ms_per_frame",
    "cores_per_gbps": "cores_per_gbps",
    "rss_max_mb": "rss_max_mb",
    "foreign_cpu_s": "foreign_cpu_s",
    "kernel_drops": "kernel_drops",
    "rcvbuf": "rcvbuf",
}


def summarize(runs: Iterable[RunResult]) -> dict[tuple[str, float, bool, str, str], dict[str, Spread]]:
    """Per point and variant: the spread of every metric over the repeats (failed runs left out)."""
    groups: dict[tuple[str, float, bool, str, str], list[RunResult]] = {}
    for run in runs:
        if run.error is None:
            groups.setdefault(run.key(), []).append(run)
    out = {}
    for key, members in groups.items():
        stats = {}
        for metric, attr in METRICS.items():
            values = [float(v) for v in (getattr(r, attr) for r in members) if v is not None]
            stats[metric] = Spread.of(values)
        out[key] = stats
    return out


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs; None when undefined (0/0); inf when only ours is non-zero."""
    if theirs == 0:
        return None if ours == 0 else float("inf")
    return ours / theirs


def fmt_ratio(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "– (both 0)"
    if value == float("inf"):
        return "∞ (peer 0)"
    return f"{value:.{digits}f}"


def ratios(summary: dict[tuple[str, float, bool, str, str], dict[str, Spread]],
           peer_variant: str = "slsReceiver") -> list[dict[str, Any]]:
    """Ours / ``peer_variant`` (slsReceiver, or the baseline revision) at each point where both ran:
    lost frames and CPU per frame (medians); the keys say ``sls_*`` for the peer either way."""
    rows = []
    for (case, rate, sustained, buffer, variant), stats in sorted(summary.items(), key=_order):
        if variant != "ours":
            continue
        peer = summary.get((case, rate, sustained, buffer, peer_variant))
        if peer is None:
            continue
        rows.append({
            "case": case, "requested_rate_hz": rate, "sustained": sustained, "buffer": buffer,
            "lost_ratio": ratio(stats["lost"].med, peer["lost"].med),
            "cpu_ratio": ratio(stats["cpu_ms_per_frame"].med, peer["cpu_ms_per_frame"].med),
            "whole_cpu_ratio": ratio(stats["whole_cpu_ms_per_frame"].med, peer["whole_cpu_ms_per_frame"].med),
            "ours_lost": stats["lost"].med, "sls_lost": peer["lost"].med,
            "ours_cpu_ms": stats["cpu_ms_per_frame"].med, "sls_cpu_ms": peer["cpu_ms_per_frame"].med,
            "ours_sent_hz": stats["send_rate_hz"].med, "sls_sent_hz": peer["send_rate_hz"].med,
        })
    return rows


def _order(item: tuple[tuple[str, float, bool, str, str], Any]) -> tuple[Any, ...]:
    case, rate, sustained, buffer, variant = item[0]
    rate_order = float("inf") if rate == 0 else rate
    variant_order = ALL_VARIANTS.index(variant) if variant in ALL_VARIANTS else len(ALL_VARIANTS)
    return (case != "jungfrau", case, sustained, rate_order, buffer != "default", variant_order)


def rate_label(rate_hz: float, sustained: bool = False, frames: int | None = None) -> str:
    if rate_hz == 0:
        label = "free-running (sender-paced)"
    else:
        label = f"{rate_hz / 1000:g} kHz" if rate_hz >= 1000 else f"{rate_hz:g} Hz"
    if sustained:
        label = f"sustained {frames:,} @ {label}" if frames else f"sustained @ {label}"
    return label


# -- machine facts ---------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(rmem_max: int) -> dict[str, Any]:
    """What the numbers depend on; recorded with every result file."""
    import h5py
    import numpy
    import psutil
    import zmq

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "psutil": psutil.__version__,
        "slsdet": _version("slsdet"),
        "rmem_max": rmem_max,
        "rmem_default": _read_int("/proc/sys/net/core/rmem_default"),
        "loadavg_start": list(os.getloadavg()),
    }


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# -- output ----------------------------------------------------------------------------------------


def _mib(n: float | None) -> str:
    return "–" if n is None or n != n else f"{n / 2**20:.0f} MiB"


def render_markdown(doc: dict[str, Any]) -> str:
    """The report: machine, Jungfrau table, ratios, per-process table, multi-module, notes."""
    runs = [RunResult.from_dict(r) for r in doc["runs"]]
    summary = summarize(runs)
    facts = doc["machine"]
    lines = [f"# Pipeline benchmark {facts['date']}", "", f"Command: `{doc['command']}`", ""]
    lines += ["## Machine", "", "| fact | value |", "|---|---|"]
    for key, value in facts.items():
        lines.append(f"| {key} | {value} |")
    jungfrau_lines = ["", "## Virtual Jungfrau (1 module, 1 MiB frames): loopback limit, slsReceiver, ours",
              "",
              "Each cell: median (min–max) over the repeats. *sent/s* = frames the virtual server sent per "
              "second of its acquisition; *lost* = frames not delivered complete (drain: not received "
              "complete; slsReceiver: not in its files with all packets; ours: not in the HDF5 file with "
              "status 0); *written/s* = complete frames / (start → last frame written): at a requested rate "
              "it is that rate; free-running it is how fast the shared virtual server sent beside that "
              "receiver on the same cores (sender-paced), **not** the receiver's capacity (compare CPU "
              "per frame instead); *CPU ms/frame* = "
              "receive + write processes per frame caught; *whole ms/frame* = the same plus the harness "
              "process (ours: supervisor and broker hub; both: the benchmark's monitor), an upper bound; "
              "*cores per GB/s* = their CPU seconds per GB "
              "delivered (the original system's sizing rule asks <= 1); *sender* = virtual server CPU per "
              "frame sent; "
              "*rcvbuf* = kernel sk_rcvbuf of the receiving socket (`ss` rb, twice the usable size); "
              "*other CPU* = CPU seconds other programs used during the run (noise).", "",
              "| run | buffer | variant | sent/s | lost % | written/s | CPU ms/frame | whole ms/frame | "
              "cores per GB/s | sender ms/frame | kernel drops | rcvbuf | RSS max MB | other CPU s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if any(r.case == "jungfrau" for r in runs):
        lines += jungfrau_lines
    frames_of = {r.key(): r.frames for r in runs}
    for key, s in sorted(summary.items(), key=_order):
        case, rate, sustained, buffer, variant = key
        if case != "jungfrau":
            continue
        label = rate_label(rate, sustained, frames_of.get(key))
        lines.append(
            f"| {label} | {buffer} | {variant} | {s['send_rate_hz'].fmt(0)} | {s['lost_pct'].fmt(2)} | "
            f"{s['wall_rate_hz'].fmt(0)} | {s['cpu_ms_per_frame'].fmt(3)} | "
            f"{s['whole_cpu_ms_per_frame'].fmt(3)} | {s['cores_per_gbps'].fmt(2)} | "
            f"{s['sender_cpu_ms_per_frame'].fmt(3)} | {s['kernel_drops'].fmt(0)} | {_mib(s['rcvbuf'].med)} | "
            f"{s['rss_max_mb'].fmt(0)} | {s['foreign_cpu_s'].fmt(1)} |")
    rows = [r for r in ratios(summary) if r["case"] == "jungfrau"]
    if rows:
        lines += ["", "## Ours / slsReceiver (medians)", "",
                  "CPU per frame compared where both ran at the same achieved rate (*sent/s ours / sls*; "
                  "free-running rows are sender-paced and the rates can differ).", "",
                  "| run | buffer | sent/s ours / sls | lost frames ours / sls | ratio | "
                  "CPU ms/frame ours / sls | ratio | whole-process ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            label = rate_label(r["requested_rate_hz"], r["sustained"])
            sent = (f"{r['ours_sent_hz']:.0f} / {r['sls_sent_hz']:.0f}" if "ours_sent_hz" in r else "–")
            lines.append(f"| {label} | {r['buffer']} | {sent} | {r['ours_lost']:g} / {r['sls_lost']:g} | "
                         f"{fmt_ratio(r['lost_ratio'])} | {r['ours_cpu_ms']:.3f} / {r['sls_cpu_ms']:.3f} | "
                         f"{fmt_ratio(r['cpu_ratio'])} | {fmt_ratio(r.get('whole_cpu_ratio'))} |")
    baseline_rows = [r for r in ratios(summary, BASELINE) if r["case"] == "jungfrau"]
    if baseline_rows:
        base = doc.get("baseline", {})
        lines += ["", f"## Ours / baseline {base.get('rev', '')} (`{base.get('commit', '?')}`) (medians)", "",
                  "The baseline is our pipeline at that revision, run by that revision's own benchmark right "
                  "after this one's runs, with its own virtual server (the same binary) and the same points.",
                  "",
                  "| run | buffer | sent/s ours / baseline | lost frames ours / baseline | "
                  "CPU ms/frame ours / baseline | ratio | whole-process ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in baseline_rows:
            label = rate_label(r["requested_rate_hz"], r["sustained"])
            lines.append(f"| {label} | {r['buffer']} | {r['ours_sent_hz']:.0f} / {r['sls_sent_hz']:.0f} | "
                         f"{r['ours_lost']:g} / {r['sls_lost']:g} | {r['ours_cpu_ms']:.3f} / "
                         f"{r['sls_cpu_ms']:.3f} | {fmt_ratio(r['cpu_ratio'])} | "
                         f"{fmt_ratio(r.get('whole_cpu_ratio'))} |")
    lines += _process_table(runs)
    lines += _multi_table(doc.get("multi", []))
    errors = [r for r in runs if r.error]
    if errors or doc.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in doc.get("notes", [])]
        lines += [f"- FAILED {rate_label(r.requested_rate_hz, r.sustained)} {r.buffer} {r.variant} "
                  f"repeat {r.repeat}: {r.error}" for r in errors]
    return "\n".join(lines) + "\n"


def _process_table(runs: list[RunResult]) -> list[str]:
    """Per process of the longest Jungfrau run of each variant: CPU per frame and RSS."""
    chosen: dict[tuple[str, str], RunResult] = {}
    for run in runs:
        if run.case != "jungfrau" or run.error:
            continue
        key = (run.buffer, run.variant)
        if key not in chosen or run.frames > chosen[key].frames:
            chosen[key] = run
    if not chosen:
        return []
    lines = ["", "## Per process (longest run of each variant, first repeat of that length)", "",
             "| run | buffer | variant | process | CPU s | CPU ms/frame | RSS start MB | RSS end MB | "
             "RSS max MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (buffer, variant), run in sorted(chosen.items(), key=lambda kv: (kv[0][0] != "default",
                                                                          ALL_VARIANTS.index(kv[0][1]))):
        label = rate_label(run.requested_rate_hz, run.sustained, run.frames)
        for name, usage in run.procs.items():
            per = run.frames if name in SENDER_PROCS or not run.caught else run.caught
            lines.append(f"| {label} | {buffer} | {variant} | {name} | {float(usage['cpu_s']):.2f} | "
                         f"{1000 * float(usage['cpu_s']) / per:.3f} | {int(usage['rss_start']) / 1e6:.0f} | "
                         f"{int(usage['rss_end']) / 1e6:.0f} | {int(usage['rss_max']) / 1e6:.0f} |")
    return lines


def _multi_table(multi: list[dict[str, Any]]) -> list[str]:
    if not multi:
        return []
    lines = ["", "## Multi-module (built-in simulator -> our pipeline -> HDF5)", "",
             "Rate stepped up until frames were lost; *highest lossless* is the last step with zero lost "
             "frames (requested, and what the simulator achieved). *sender ceiling* = the simulator's own "
             "free-running rate measured in the same run with nothing receiving (`bench_sender.py`'s "
             "*unread* sink): a step whose achieved rate is near it, or below its request, measured the "
             "sender, not the pipeline. *sender slips*: times the simulator, sharing the cores with the "
             "pipeline, fell more than max(period, 2 ms) behind and restarted its schedule.", "",
             "| detector | image | modules | buffer | sender ceiling/s | steps: requested → sent/s (lost) | "
             "highest lossless requested | achieved/s | GB/s | CPU ms/frame | cores per GB/s | "
             "stopped because |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in multi:
        steps = "; ".join(f"{s['requested_rate_hz']:g}→{s['send_rate_hz']:.0f} ({s['lost']} lost"
                          + (f", {s['sender_slips']} sender slips" if s.get("sender_slips") else "") + ")"
                          if not s.get("error") else f"{s['requested_rate_hz']:g}: failed"
                          for s in m["steps"])
        best = m.get("best")
        ceiling = m.get("sender_ceiling_hz")
        ceiling_text = f"{ceiling:.0f}" if ceiling else "not measured"
        if best:
            lines.append(f"| {m['detector']} | {m['image']} | {m['modules']} | {m['buffer']} | "
                         f"{ceiling_text} | {steps} | "
                         f"{best['requested_rate_hz']:g} Hz | {best['send_rate_hz']:.0f} | "
                         f"{best['gbps']:.2f} | {best['cpu_ms_per_frame']:.3f} | "
                         f"{best['cores_per_gbps']:.2f} | {m.get('stopped_because', '')} |")
        else:
            lines.append(f"| {m['detector']} | {m['image']} | {m['modules']} | {m['buffer']} | "
                         f"{ceiling_text} | {steps} | none lossless | – | – | – | – | "
                         f"{m.get('stopped_because', '')} |")
    return lines


def write_outputs(doc: dict[str, Any], out_base: Path) -> tuple[Path, Path, str]:
    """``<out_base>.json`` and ``<out_base>.md``; returns their paths and the Markdown."""
    out_base.parent.mkdir(parents=True, exist_ok=True)
    json_path = out_base.with_suffix(".json")
    md_path = out_base.with_suffix(".md")
    json_path.write_text(json.dumps(doc, indent=1, default=_json_default))
    markdown = render_markdown(doc)
    md_path.write_text(markdown)
    return json_path, md_path, markdown


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_doc(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a bench_pipeline result "
                         f"(schema {doc.get('schema')!r}, want {SCHEMA!r})")
    return doc
