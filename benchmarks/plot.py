"""PNG of a ``bench_pipeline`` result: rate and loss versus requested rate, ours beside slsReceiver.

One column per socket-buffer mode. Top: frames per second the virtual server sent (dashed, hollow)
and complete frames written per second (solid) for the drain, slsReceiver and ours; below: lost
frames in percent. One colour per variant; points are medians, bars span min–max over the repeats.
Free-running and the sustained run sit at the right of a categorical axis (the requested rates are not
evenly spaced anyway). Multi-module results go into a bottom panel (sent rate per step, losses marked).

    python benchmarks/plot.py benchmarks/out/<timestamp>.json [--out FILE.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _report import RunResult, load_doc, rate_label, summarize  # noqa: E402

COLORS = {"drain": "tab:gray", "slsReceiver": "tab:blue", "ours": "tab:orange"}
OFFSETS = {"drain": -0.12, "slsReceiver": 0.0, "ours": 0.12}


def _categories(keys: list[tuple[str, float, bool, str, str]]) -> list[tuple[float, bool]]:
    points = {(rate, sustained) for case, rate, sustained, _b, _v in keys if case == "jungfrau"}
    return sorted(points, key=lambda p: (p[1], float("inf") if p[0] == 0 else p[0]))


def render_plot(doc: dict[str, Any], path: Path) -> Path:
    """Draw ``doc`` (a result document) into ``path``; returns it."""
    runs = [RunResult.from_dict(r) for r in doc["runs"]]
    summary = summarize(runs)
    categories = _categories(list(summary))
    buffers = [b for b in ("default", "large") if any(k[3] == b and k[0] == "jungfrau" for k in summary)]
    frames_of = {(r.requested_rate_hz, r.sustained): r.frames for r in runs if r.case == "jungfrau"}
    rmem_of = {r.buffer: r.rmem_max for r in runs}
    multi = [m for m in doc.get("multi", []) if m.get("steps")]
    n_cols = max(1, len(buffers))
    n_rows = 3 if multi else 2
    fig = plt.figure(figsize=(6.5 * n_cols, 3.8 * n_rows))
    grid = fig.add_gridspec(n_rows, n_cols)
    labels = [rate_label(r, s, frames_of.get((r, s))).replace("sustained ", "sustained\n")
              for r, s in categories]
    for col, buffer in enumerate(buffers):
        ax_rate = fig.add_subplot(grid[0, col])
        ax_loss = fig.add_subplot(grid[1, col], sharex=ax_rate)
        for variant in ("drain", "slsReceiver", "ours"):
            series = [(categories.index((k[1], k[2])), summary[k]) for k in summary
                      if k[0] == "jungfrau" and k[3] == buffer and k[4] == variant]
            if not series:
                continue
            series.sort(key=lambda item: item[0])
            color = COLORS[variant]
            for ax, metric, style, text, hollow in ((ax_rate, "wall_rate_hz", "-", "written", False),
                                                    (ax_rate, "send_rate_hz", "--", "sent", True),
                                                    (ax_loss, "lost_pct", "-", "", False)):
                xs = [i + OFFSETS[variant] for i, _ in series]
                spreads = [st[metric] for _, st in series]
                meds = [sp.med for sp in spreads]
                err = [[sp.med - sp.lo for sp in spreads], [sp.hi - sp.med for sp in spreads]]
                label = f"{variant} {text}".strip()
                # connect the period points; the sustained run stands alone
                ax.errorbar(xs, meds, yerr=err, color=color, marker="o", linestyle="none", capsize=3,
                            mfc="white" if hollow else color, label=label)
                joined = [(x, m) for (i, _), x, m in zip(series, xs, meds, strict=True)
                          if not categories[i][1]]
                if len(joined) > 1:
                    ax.plot([x for x, _ in joined], [m for _, m in joined], color=color, linestyle=style)
        requested = [(i, r) for i, (r, _s) in enumerate(categories) if r > 0]
        if requested:
            ax_rate.plot([i for i, _ in requested], [r for _, r in requested], "kx", label="requested")
        cap = rmem_of.get(buffer)
        cap_text = f"rmem_max {cap / 2**20:.0f} MiB" if cap else ""
        ax_rate.set_title(f"{buffer} socket buffer ({cap_text}): frames / s", fontsize=10)
        ax_loss.set_title(f"{buffer} socket buffer: lost frames (%)", fontsize=10)
        ax_rate.set_ylabel("frames / s (dashed, hollow: sent)")
        ax_loss.set_ylabel("lost (%)")
        ax_loss.set_xlabel("requested rate (1 / period)")
        for ax in (ax_rate, ax_loss):
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_xlim(-0.5, len(categories) - 0.5)
            ax.grid(True, axis="y", alpha=0.3)
        ax_loss.set_ylim(-0.5, max(1.0, ax_loss.get_ylim()[1]))
        _dedupe_legend(ax_rate)
        _dedupe_legend(ax_loss)
    if multi:
        _multi_panel(fig.add_subplot(grid[n_rows - 1, :]), multi)
    machine = doc.get("machine", {})
    fig.suptitle(f"std-daq pipeline vs slsReceiver, virtual Jungfrau, {machine.get('date', '')}\n"
                 f"{machine.get('nproc', '?')} cores {machine.get('cpu_model', '')}; "
                 "median, bars min–max over repeats", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _multi_panel(ax: Any, multi: list[dict[str, Any]]) -> None:
    for i, m in enumerate(multi):
        steps = m["steps"]
        xs = [s["requested_rate_hz"] for s in steps]
        ys = [s["send_rate_hz"] for s in steps]
        lost = [s["lost"] for s in steps]
        marker = "o" if m["buffer"] == "default" else "s"
        color = f"C{i % 10}"
        ax.plot(xs, ys, marker=marker, color=color, label=f"{m['detector']} ({m['buffer']})")
        for x, y, n in zip(xs, ys, lost, strict=True):
            if n:
                ax.annotate(f"{n} lost", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color="red")
    top = max(max(s["requested_rate_hz"] for s in m["steps"]) for m in multi)
    low = min(min(s["requested_rate_hz"] for s in m["steps"]) for m in multi)
    ax.plot([low, top], [low, top], color="black", alpha=0.3, linestyle=":", label="sent = requested")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("requested rate (Hz)")
    ax.set_ylabel("sent frames / s")
    ax.set_title("Multi-module (simulator → ours): rate stepped up until frames are lost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _dedupe_legend(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for handle, label in zip(handles, labels, strict=True):
        seen.setdefault(label, handle)
    if seen:
        ax.legend(seen.values(), seen.keys(), fontsize=7, ncol=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot.py", description="Plot a bench_pipeline result JSON.")
    parser.add_argument("result", type=Path, help="benchmarks/out/<timestamp>.json")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the JSON)")
    args = parser.parse_args(argv)
    try:
        doc = load_doc(args.result)
    except (OSError, ValueError) as exc:
        print(f"plot.py: {exc}", file=sys.stderr)
        return 2
    out = render_plot(doc, args.out or args.result.with_suffix(".png"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
