"""``std-daq`` command line.

Each subcommand is one ``add_<name>(subparsers)`` function that registers its parser and sets
``func`` (called with the parsed namespace, returns the exit code); list it in ``SUBCOMMANDS``.
Commands that own a complete parser elsewhere are listed in ``PASSTHROUGH`` and get ``argv``
unchanged (``std-daq simulate --help`` shows the simulator's own help).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daq_backend import ipc
from daq_backend.config import ConfigError, load_config

Subparsers = Any  # argparse's private _SubParsersAction

#: subcommand -> "module:function" taking the remaining argv and returning an exit code
PASSTHROUGH: dict[str, tuple[str, str]] = {
    "simulate": ("daq_backend.simulator.sender:main", "send detector UDP packets (simulated detector)"),
}


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


# -- up ----------------------------------------------------------------------------------------


def add_up(sub: Subparsers) -> None:
    p = sub.add_parser("up", help="start and supervise every process of one detector (Ctrl-C stops all)")
    p.add_argument("config", help="detector JSON file")
    p.add_argument("--status-interval", type=float, default=1.0, help="seconds between status updates")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    from daq_backend.supervisor import Supervisor

    _setup_logging(args.log_level)
    config = load_config(args.config)
    supervisor = Supervisor(config, Path(args.config).resolve(), status_interval=args.status_interval)
    print(f"std-daq: {config.detector_name} up ({len(supervisor.services)} services); "
          f"`std-daq status {args.config}` shows them; Ctrl-C stops all", file=sys.stderr)
    try:
        supervisor.run()
    except RuntimeError as exc:
        print(f"std-daq up: {exc}", file=sys.stderr)
        return 1
    return 0


# -- status ------------------------------------------------------------------------------------


def add_status(sub: Subparsers) -> None:
    p = sub.add_parser("status", help="liveness and counters of the processes of running detectors")
    p.add_argument("config", nargs="?", help="detector JSON file (default: every detector that is up)")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=cmd_status)


#: counters shown in the "problems" column when non-zero
PROBLEM_COUNTERS = (
    "frames_incomplete", "frames_skipped", "images_skipped", "bad_datagrams", "duplicate_packets",
    "out_of_order_packets", "late_packets", "frames_unannounced", "images_missing_packets",
    "images_id_mismatch", "missing_module_frames", "lapped_frames", "duplicate_frames", "late_frames",
    "ignored_frames", "bad_messages", "errors",
)


def cmd_status(args: argparse.Namespace) -> int:
    from daq_backend.supervisor import read_status

    if args.config:
        paths = [ipc.status_file(load_config(args.config).detector_name)]
        paths = [p for p in paths if Path(p).exists()]
    else:
        paths = sorted(glob.glob(f"{glob.escape(ipc.ipc_dir())}/std-daq-*-status.json"))
    if not paths:
        what = "this detector is not up" if args.config else "no detector is up"
        print(f"std-daq: {what} (no status file in {ipc.ipc_dir()})", file=sys.stderr)
        return 1
    statuses = [read_status(p) for p in paths]
    if args.json:
        print(json.dumps(statuses, indent=1))
    else:
        for status in statuses:
            render_status(status)
    return 0 if all(not s["stale"] and all(x["alive"] for x in s["services"]) for s in statuses) else 3


def render_status(status: dict[str, Any]) -> None:
    """One rich table per detector."""
    from rich.console import Console
    from rich.table import Table

    age = time.time() - float(status.get("updated", 0))
    state = "[red]STALE (supervisor gone)[/red]" if status.get("stale") else "[green]up[/green]"
    table = Table(title=f"{status['detector']}  {state}  supervisor pid {status.get('supervisor_pid')}  "
                        f"updated {age:.1f} s ago")
    for column in ("service", "pid", "alive", "restarts", "packets", "frames", "images", "lost pkts",
                   "rate", "problems"):
        table.add_column(column, justify="left" if column in ("service", "problems") else "right")
    for svc in status["services"]:
        c = svc.get("counters", {})
        r = svc.get("rates", {})
        rate = ""
        if "frames" in r or "images" in r:
            per_s = r.get("images", r.get("frames", 0.0))
            rate = f"{per_s:.1f}/s {r.get('bytes', 0.0) / 1e6:.1f} MB/s"
        problems = ", ".join(f"{k}={c[k]}" for k in PROBLEM_COUNTERS if c.get(k))
        alive = "[green]yes[/green]" if svc["alive"] else f"[red]no ({svc.get('exit_code')})[/red]"
        table.add_row(
            svc["name"], str(svc.get("pid") or "-"), alive, str(svc.get("restarts", 0)),
            _fmt(c.get("packets")), _fmt(c.get("frames")), _fmt(c.get("images")),
            _fmt(c.get("missing_packets")), rate, problems,
        )
    Console().print(table)


def _fmt(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


# -- registry ----------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Subparsers], None]] = [add_up, add_status]


def _resolve(target: str) -> Callable[[list[str]], int | None]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="std-daq", description="PSI std-daq detector DAQ in Python")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    for name, (_, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        return int(_resolve(PASSTHROUGH[argv[0]][0])(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"std-daq: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
