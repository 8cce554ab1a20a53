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
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daq_backend import ipc
from daq_backend.config import ConfigError, DetectorConfig, load_config
from daq_backend.topology import Topology

Subparsers = Any  # argparse's private _SubParsersAction

#: subcommand -> "module:function" taking the remaining argv and returning an exit code
PASSTHROUGH: dict[str, tuple[str, str]] = {
    "demo": ("daq_backend.demo:demo_main", "the whole DAQ here, driven by a bluesky scan and checked"),
    "simulate": ("daq_backend.simulator.sender:main", "send detector UDP packets (simulated detector)"),
    "write": ("daq_backend.writer.client:write_main", "write the next N images to an HDF5 file"),
    "listen": ("daq_backend.writer.client:listen_main", "live monitor of broker requests and status"),
    "writer-agent": ("daq_backend.writer.agent:writer_agent_main", "serve write requests of one detector"),
    "h5-writer": ("daq_backend.writer.h5_writer:h5_writer_main", "the HDF5 writer process of a writer agent"),
    "rest": ("daq_backend.rest.server:rest_main", "REST API (seed endpoints + std-daq admin interface)"),
    "stream-send": ("daq_backend.stream.send:main", "replicate the image buffer to another server (ZMQ)"),
    "stream-recv": ("daq_backend.stream.recv:main", "receive a replicated image buffer into a local ring"),
    "live-stream": ("daq_backend.stream.live:main", "Array-1.0 live stream of the images for viewers"),
    "preview": ("daq_backend.stream.preview:main", "write a colour-mapped PNG of the latest image"),
    "epics-buffer": ("daq_backend.epics.buffer:main", "record EPICS PVs into Redis streams"),
    "epics-writer": ("daq_backend.epics.service:main", "write buffered PVs of a pulse-id range to HDF5"),
    "sim-ioc": ("daq_backend.epics.sim_ioc:main", "simulated IOC: pulse-id PV and PVs of several types"),
    "build-sls": ("daq_backend.control.sls_build:main", "build slsDetectorPackage's virtual detectors once"),
}


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


# -- up ----------------------------------------------------------------------------------------


def add_up(sub: Subparsers) -> None:
    p = sub.add_parser("up", help="start and supervise every process of one detector (Ctrl-C stops all)")
    p.add_argument("config", help="detector JSON file")
    p.add_argument("--status-interval", type=float, default=1.0, help="seconds between status updates")
    p.add_argument("--broker_url", "--broker-url", dest="broker_url", default=None,
                   help="amqp://... puts the detector on RabbitMQ "
                        "(default: env BROKER_URL, else BROKER_HOST, else the embedded broker)")
    p.add_argument("--rest-port", "--rest_port", dest="rest_port", type=int, default=5000,
                   help="port of the REST API (default 5000; 0: no REST API)")
    p.add_argument("--rest-host", "--rest_host", dest="rest_host", default="127.0.0.1", metavar="ADDR",
                   help="address the REST API listens on (default 127.0.0.1; another one, e.g. 0.0.0.0 "
                        "for a bluesky session on another host, needs a token)")
    p.add_argument("--token-file", "--token_file", dest="token_file", default=None, metavar="PATH",
                   help="file holding the token REST commands need (default: env STD_DAQ_TOKEN, "
                        "else no token: then the API listens on loopback only)")
    p.add_argument("--host", dest="readout_host", default=None, metavar="NAME",
                   help="run only this host's share of a detector split over readout_hosts (its "
                        "receivers, an assembler of its modules' partial image, its writers)")
    p.add_argument("--no-writer", dest="writer", action="store_false", help="do not start the writer agent")
    p.add_argument("--detector-control", "--detector_control", default="simulated",
                   choices=("simulated", "sls", "none"),
                   help="what the REST API's /detector endpoints drive (default: the built-in simulator)")
    p.add_argument("--detector-host", "--detector_host", dest="detector_hosts", action="append", default=[],
                   help="slsdet hostname[:port] of a module (repeatable, or joined with '+')")
    p.add_argument("--configure-udp", "--configure_udp", action="store_true",
                   help="point the detector's UDP stream at this DAQ at start-up")
    p.add_argument("--output-root", "--output_root", dest="output_roots", action="append", default=[],
                   metavar="FOLDER",
                   help="a folder files may be written in (repeatable; default: env STD_DAQ_OUTPUT_ROOTS, "
                        "else the data root $XDG_DATA_HOME/std-daq, i.e. ~/.local/share/std-daq); given to "
                        "the h5 writer, the writer agent and the REST API")
    p.add_argument("--stream-send", "--stream_send", dest="stream_send", default=None, metavar="ADDRESS",
                   help="also replicate the image buffer on this address (e.g. tcp://*:9000)")
    p.add_argument("--live-stream", "--live_stream", dest="live_stream", default=None, metavar="ADDRESS",
                   help="also serve the Array-1.0 live stream on this address (e.g. tcp://*:9100)")
    p.add_argument("--live-stream-mode", "--live_stream_mode", dest="live_stream_mode", default="forward",
                   choices=("forward", "periodic", "batch"), help="which images the live stream sends")
    p.add_argument("--live-stream-param", "--live_stream_param", dest="live_stream_param", default=None,
                   metavar="N,X",
                   help="periodic: 'n,f' (n images every 1/f s); batch: 'n,m' (image_id %% m < n)")
    p.add_argument("--log_level", "--log-level", dest="log_level", default="INFO", type=str.upper,
                   choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"),
                   help="of the supervisor and every process it starts")
    p.set_defaults(func=cmd_up)


def up_topology(args: argparse.Namespace, config: DetectorConfig, broker_url: str) -> Topology:
    """The processes ``std-daq up`` runs for ``config``: the readout, writer agent + h5 writer, the
    REST API and the optional streams. They read the supervisor's live copy of the config."""
    rest_args = ["--detector-control", args.detector_control]
    rest_args += [f"--detector-host={h}" for h in args.detector_hosts]
    rest_args += ["--configure-udp"] if args.configure_udp else []
    rest_args += [f"--token-file={Path(args.token_file).resolve()}"] if args.token_file else []
    live_args: tuple[str, ...] = ("--mode", args.live_stream_mode)
    live_args += ("--param", args.live_stream_param) if args.live_stream_param else ()
    return Topology(
        config, Path(ipc.config_file(config.detector_name)), broker_url, writer=args.writer,
        rest_port=args.rest_port or None, rest_host=args.rest_host, rest_args=tuple(rest_args),
        stream_send=args.stream_send,
        live_stream=args.live_stream, live_stream_args=live_args,
        output_roots=tuple(str(Path(r).expanduser().absolute()) for r in args.output_roots),
        log_level=args.log_level,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from daq_backend.broker import EmbeddedBrokerHub, resolve_broker_url
    from daq_backend.broker.transport import DEFAULT_EMBEDDED_NAME, EMBEDDED
    from daq_backend.supervisor import Supervisor

    _setup_logging(args.log_level)
    config_path = Path(args.config).resolve()
    config = load_config(config_path)
    user_config: Path | None = config_path
    if args.readout_host is not None:
        try:
            config = config.for_host(args.readout_host)
        except ValueError as exc:
            print(f"std-daq up: {exc}", file=sys.stderr)
            return 2
        user_config = None  # a host's share is never saved over the whole detector's file
    elif config.readout_hosts:
        print(f"std-daq up: {config_path} splits {config.detector_name} over readout_hosts "
              f"({', '.join(config.readout_hosts)}): give --host NAME on each", file=sys.stderr)
        return 2
    if args.rest_port:
        from daq_backend.auth import TokenError, listen_problem, server_token

        try:
            problem = listen_problem(args.rest_host, server_token(args.token_file))
        except TokenError as exc:
            problem = str(exc)
        if problem is not None:
            print(f"std-daq up: {problem}", file=sys.stderr)
            return 2
    broker_url = resolve_broker_url(args.broker_url)
    embedded = broker_url == EMBEDDED or broker_url.startswith(f"{EMBEDDED}://")
    if embedded:
        name = broker_url.removeprefix(EMBEDDED).removeprefix("://").strip("/") or DEFAULT_EMBEDDED_NAME
        broker_url = f"{EMBEDDED}://{name}"
    supervisor = Supervisor(config, user_config, topology=up_topology(args, config, broker_url),
                            status_interval=args.status_interval)
    try:
        # before anything is claimed (the broker hub, the status file): the detector is not up already
        # (RuntimeError), this host can run it (UDP ports, /dev/shm: a ConfigError naming the field)
        supervisor.check_can_start()
    except RuntimeError as exc:
        print(f"std-daq up: {exc}", file=sys.stderr)
        return 1
    hub: EmbeddedBrokerHub | None = None
    if embedded:
        hub = EmbeddedBrokerHub(name)
        try:
            hub.start()
        except RuntimeError as exc:  # another `std-daq up` owns it: share it
            logging.getLogger("std-daq").info("%s", exc)
            hub = None
    try:
        try:
            supervisor.start()
        except RuntimeError as exc:
            print(f"std-daq up: {exc}", file=sys.stderr)
            return 1
        topology = supervisor.topology
        rest = f"REST {topology.rest_url} on {args.rest_host}, " if topology.rest_url else ""
        print(f"std-daq: {config.detector_name} up ({len(supervisor.services)} services; {rest}"
              f"broker {broker_url}); `std-daq status {args.config}` shows them; Ctrl-C stops all",
              file=sys.stderr)
        supervisor.run()
    finally:
        if hub is not None:
            hub.stop()
    return 0


# -- status ------------------------------------------------------------------------------------


def add_status(sub: Subparsers) -> None:
    p = sub.add_parser("status", help="liveness and counters of the processes of running detectors")
    p.add_argument("config", nargs="?", help="detector JSON file (default: every detector that is up)")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=cmd_status)


#: counters shown in the "problems" column when non-zero
PROBLEM_COUNTERS = (
    "frames_incomplete", "frames_skipped", "images_skipped", "bad_datagrams", "rejected_module_id",
    "rejected_out_of_range", "rejected_out_of_window", "duplicate_packets",
    "out_of_order_packets", "late_packets", "images_missing_packets",
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
    for status in statuses:
        if not status.get("stale"):
            status["broker_health"] = broker_health(status)
    if args.json:
        print(json.dumps(statuses, indent=1))
    else:
        for status in statuses:
            render_status(status)
    return 0 if all(_healthy(s) for s in statuses) else 3


def _healthy(status: dict[str, Any]) -> bool:
    broker = status.get("broker_health") or {}
    return (not status["stale"] and all(x["alive"] for x in status["services"])
            and broker.get("broker") != "down")


#: seconds ``std-daq status`` waits for the REST API's /health (or the broker) before calling it down
STATUS_PROBE_TIMEOUT = 3.0


def broker_health(status: dict[str, Any]) -> dict[str, Any]:
    """Whether the detector's broker is reachable: the REST API's ``/health`` (its own connection)
    when it runs, else a connection attempt to the broker's address. ``{"broker": "up"|"down"|
    "unknown", "broker_where", "broker_error", "via"}``."""
    import socket
    import urllib.parse

    import httpx

    url = str(status.get("broker") or "")
    rest = status.get("rest_url")
    if rest:
        try:
            answer = httpx.get(f"{rest}/health", timeout=STATUS_PROBE_TIMEOUT).json()
            if answer.get("broker") in ("up", "down"):
                return {"broker": answer["broker"], "broker_where": answer.get("broker_where", url),
                        "broker_error": answer.get("broker_error"), "via": "rest"}
        except (httpx.HTTPError, ValueError, AttributeError):
            pass  # no answer from the API: ask the broker itself
    if url.startswith(("amqp://", "amqps://")):
        parts = urllib.parse.urlsplit(url)
        where = f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672),
                                          timeout=STATUS_PROBE_TIMEOUT):
                return {"broker": "up", "broker_where": where, "broker_error": None, "via": "tcp"}
        except OSError as exc:
            return {"broker": "down", "broker_where": where, "broker_error": str(exc), "via": "tcp"}
    if url.startswith("embedded"):
        from daq_backend.broker.embedded_hub import hub_is_running

        name = url.removeprefix("embedded").removeprefix("://").strip("/") or "default"
        up = hub_is_running(name)
        return {"broker": "up" if up else "down", "broker_where": url,
                "broker_error": None if up else "the embedded hub does not answer", "via": "hub"}
    return {"broker": "unknown", "broker_where": url, "broker_error": None, "via": None}


def render_status(status: dict[str, Any], console: Any = None) -> None:
    """One rich table per detector. Nothing is cut: on a terminal narrower than the table the cells
    wrap; into a pipe or file the table keeps its natural width."""
    from rich.console import Console
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.table import Table

    age = time.time() - float(status.get("updated", 0))
    state = "[red]STALE (supervisor gone)[/red]" if status.get("stale") else "[green]up[/green]"
    table = Table(title=f"{status['detector']}  {state}  supervisor pid {status.get('supervisor_pid')}  "
                        f"updated {age:.1f} s ago")
    for column in ("service", "pid", "alive", "restarts", "packets", "frames", "images", "lost pkts",
                   "rate", "problems"):
        table.add_column(column, justify="left" if column in ("service", "problems") else "right",
                         overflow="fold")
    for svc in status["services"]:
        c = svc.get("counters", {})
        r = svc.get("rates", {})
        rate = ""
        if "frames" in r or "images" in r:
            per_s = r.get("images", r.get("frames", 0.0))
            rate = f"{per_s:.1f}/s {r.get('bytes', 0.0) / 1e6:.1f} MB/s"
        problems = ", ".join(f"{k}={c[k]}" for k in PROBLEM_COUNTERS if c.get(k))
        alive = "[green]yes[/green]" if svc["alive"] else f"[red]no ({svc.get('exit_code')})[/red]"
        if svc.get("failed"):
            alive = "[red]failed[/red]"
            problems = f"cannot start: {escape(str(svc['failed']))}" + (f"; {problems}" if problems else "")
        table.add_row(
            svc["name"], str(svc.get("pid") or "-"), alive, str(svc.get("restarts", 0)),
            _fmt(c.get("packets")), _fmt(c.get("frames")), _fmt(c.get("images")),
            _fmt(c.get("missing_packets")), rate, problems,
        )
    if console is None:
        console = Console()
        if not console.is_terminal:
            wide = Console(width=10_000)
            console = Console(width=max(80, Measurement.get(wide, wide.options, table).maximum))
    console.print(table)
    broker = status.get("broker_health")
    if broker and broker["broker"] == "down":
        where, why = escape(str(broker["broker_where"])), escape(str(broker["broker_error"]))
        console.print(f"[red]broker {where}: DOWN ({why}); write requests are refused (503) until it is "
                      "back[/red]")
    elif broker and broker["broker"] == "up":
        console.print(f"broker {escape(str(broker['broker_where']))}: up")
    if status.get("ended"):
        console.print(f"[red]{status['ended']}[/red]")


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
        try:
            return int(_resolve(PASSTHROUGH[argv[0]][0])(argv[1:]) or 0)
        except ConfigError as exc:  # every command refuses a bad detector config in one line
            print(f"std-daq {argv[0]}: {exc}", file=sys.stderr)
            return 2
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


def run(argv: list[str] | None = None) -> int:
    """``main`` as a program: a reader that closes the pipe early (``std-daq status --json | head``)
    ends the output quietly instead of with a BrokenPipeError."""
    try:
        code = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout once more at exit: point it at /dev/null so that flush cannot fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(run())
