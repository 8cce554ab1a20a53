"""Benchmark records: the small JSON every benchmark's ``--record`` writes to ``benchmarks/records/``.

A record is the only source of the figures in ``benchmarks/RESULTS.md`` and the README's benchmark
table (``benchmarks/report.py`` renders both from the records alone). It holds what the figures depend
on and how to reproduce them:

* ``bench``: the script's name (the file is ``records/<bench>.json``);
* ``commit``: ``git rev-parse HEAD`` of the tree that ran, and ``dirty`` when files differed from it;
* ``command``: the exact command line; ``date`` (UTC); ``machine``: CPU model, cores, kernel, Python,
  load average before and after (a loaded machine is visible in the record);
* ``figures``: every number the report shows, flat (name -> number or short string);
* ``tables``: titled tables (``columns`` + ``rows`` of cells) as the script formatted them;
* ``notes``: what a reader must know (e.g. "the machine was shared with other jobs").

Kept small: raw per-sample outputs stay in ``benchmarks/out/`` (git-ignored); the records are committed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RECORDS_DIR = BENCH_DIR / "records"
SCHEMA = 1

Cell = str | int | float | None


@dataclass
class Table:
    """One table of a record: ``rows`` of cells under ``columns``; ``caption`` says what they mean."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "caption": self.caption}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Table:
        return cls(data["title"], list(data["columns"]), [list(r) for r in data["rows"]],
                   data.get("caption", ""))


@dataclass
class Record:
    bench: str
    command: str
    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] | None = None
    commit: str = ""
    dirty: bool = False
    date: str = ""
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": SCHEMA, "bench": self.bench, "date": self.date, "commit": self.commit,
            "dirty": self.dirty, "command": self.command, "machine": self.machine, "notes": self.notes,
            "figures": self.figures, "tables": [t.to_dict() for t in self.tables],
        }
        if self.raw is not None:
            data["raw"] = self.raw
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"record schema {data.get('schema')!r}, expected {SCHEMA}")
        return cls(
            bench=data["bench"], command=data["command"], figures=dict(data.get("figures", {})),
            tables=[Table.from_dict(t) for t in data.get("tables", [])], notes=list(data.get("notes", [])),
            raw=data.get("raw"), commit=data.get("commit", ""), dirty=bool(data.get("dirty", False)),
            date=data.get("date", ""), machine=dict(data.get("machine", {})),
        )


def table_from_markdown(title: str, header: str, rows: Sequence[str], caption: str = "") -> Table:
    """A :class:`Table` from a script's Markdown header line and row lines (cells as it wrote them)."""
    def cells(line: str) -> list[Cell]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    return Table(title, [str(c) for c in cells(header.splitlines()[0])], [cells(r) for r in rows], caption)


#: what ``--record`` itself writes: a difference there does not make the measured code "dirty"
GENERATED = ("benchmarks/records", "benchmarks/RESULTS.md", "README.md", "benchmarks/bench_pipeline*.png")


def git_commit(repo: Path = REPO) -> tuple[str, bool]:
    """(HEAD's short hash, whether tracked files other than :data:`GENERATED` differ from it);
    ("unknown", False) outside git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no",
                                 "--", ".", *(f":!{p}" for p in GENERATED)],
                                check=True, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return head, bool(status.strip())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, kernel, Python and the load average now, and the commit that runs
    (under ``"commit"``/``"dirty"``; :func:`finish` moves them into the record)."""
    commit, dirty = git_commit()
    return {
        "commit": commit, "dirty": dirty,
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
        "python": sys.version.split()[0], "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """``python benchmarks/<script> ARGS`` as it was run."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in args)])


def finish(record: Record, machine: dict[str, Any] | None = None) -> Record:
    """Fill in commit (unless the script took it when it started), date and machine (``machine``
    from the start of the run, else now) and the load average at the end."""
    record.date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record.machine = dict(machine or machine_info())
    commit, dirty = record.machine.pop("commit", None), record.machine.pop("dirty", False)
    if not record.commit:
        record.commit, record.dirty = commit or "unknown", bool(dirty)
    record.machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    return record


def write_record(record: Record, machine: dict[str, Any] | None = None,
                 directory: Path = RECORDS_DIR) -> Path:
    """Write ``records/<bench>.json`` (replacing the previous one); returns its path."""
    finish(record, machine)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.bench}.json"
    path.write_text(json.dumps(record.to_dict(), indent=1, default=_json_default) + "\n")
    return path


def record_and_report(record: Record, machine: dict[str, Any] | None = None) -> Path:
    """:func:`write_record`, then regenerate RESULTS.md and the README table (``report.py``)."""
    path = write_record(record, machine)
    print(f"recorded in {path}")
    import report

    report.main([])
    return path


def load_records(directory: Path = RECORDS_DIR) -> dict[str, Record]:
    """Every record in ``directory`` by bench name."""
    out: dict[str, Record] = {}
    for path in sorted(directory.glob("*.json")):
        record = Record.from_dict(json.loads(path.read_text()))
        out[record.bench] = record
    return out


def compact(value: Any, max_items: int = 256) -> Any:
    """``value`` without its long lists (per-image or per-sample series, > ``max_items``): they stay
    in ``benchmarks/out/``; a record keeps the figures computed from them."""
    if isinstance(value, dict):
        return {k: compact(v, max_items) for k, v in value.items()
                if not (isinstance(v, list | tuple) and len(v) > max_items)}
    if isinstance(value, list | tuple):
        return [compact(v, max_items) for v in value]
    if hasattr(value, "tolist"):
        listed = value.tolist()
        return None if isinstance(listed, list) and len(listed) > max_items else listed
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
