"""``std-daq write`` (one write request, a progress bar, the result) and ``std-daq listen``.

``write`` reaches the writer agent of a detector through the broker: RabbitMQ with ``--broker-url``
(or ``BROKER_URL`` / ``BROKER_HOST``), else the embedded hub that ``std-daq up`` runs. The detector
(= the agent's tag) is ``--detector``, else ``STD_DAQ_DETECTOR``, else the only detector that is up
on this host. Nothing waits a fixed time: the command ends with the request, Ctrl-C kills the
request (the file is closed cleanly) and waits for the writer to confirm.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import threading
from typing import Any, TextIO

from tqdm import tqdm

from daq_backend import ipc
from daq_backend.broker import (
    Action,
    BrokerClient,
    NoRouteError,
    StatusAggregator,
    StatusMessage,
    make_transport,
    run_listener,
)
from daq_backend.writer.request import RequestError, parse_write_request

DETECTOR_ENV = "STD_DAQ_DETECTOR"


class CliError(Exception):
    """A problem to print as one line and exit with code 2."""


def running_detectors() -> list[str]:
    """Names of the detectors a live ``std-daq up`` runs on this host (from their status files)."""
    from daq_backend.supervisor import read_status

    names = []
    for path in sorted(glob.glob(f"{glob.escape(ipc.ipc_dir())}/std-daq-*-status.json")):
        try:
            status = read_status(path)
        except (OSError, ValueError):
            continue
        if not status.get("stale") and status.get("detector"):
            names.append(str(status["detector"]))
    return names


def resolve_detector(name: str | None) -> str:
    if name:
        return name
    if os.environ.get(DETECTOR_ENV):
        return os.environ[DETECTOR_ENV]
    names = running_detectors()
    if len(names) == 1:
        return names[0]
    if not names:
        raise CliError(f"no detector is up on this host: name one with --detector NAME (or ${DETECTOR_ENV})")
    raise CliError(f"several detectors are up ({', '.join(names)}): choose one with --detector NAME")


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request body from the command line; checked here except for the output folder, which
    only the agent's host can judge."""
    body: dict[str, Any] = {"output_file": os.path.abspath(args.output), "n_images": args.n_images}
    if args.metadata is not None:
        try:
            body["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise CliError(f"--metadata is not valid JSON ({exc})") from None
    for key in ("start_id", "timeout"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.compression != "none":
        body["compression"] = args.compression
    if args.overwrite:
        body["overwrite"] = True
    try:
        parse_write_request(body, check_filesystem=False)
    except RequestError as exc:
        raise CliError(str(exc)) from None
    return body


def write_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="std-daq write", description="Write the next N images of a detector "
                                "to an HDF5 file (one request to its writer agent).")
    p.add_argument("--n-images", "--n_images", type=int, required=True, help="number of images")
    p.add_argument("--output", "--output-file", "--output_file", required=True, help="HDF5 file to create")
    p.add_argument("--metadata", help="JSON object stored as attributes of /entry")
    p.add_argument("--start-id", "--start_id", type=int,
                   help="first image id (taken from the RAM buffer if still there)")
    p.add_argument("--compression", choices=["none", "bitshuffle-lz4"], default="none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--timeout", type=float, help="give up when no image arrives for this many seconds")
    p.add_argument("--detector",
                   help=f"detector (writer agent tag); default ${DETECTOR_ENV}, else the one that is up")
    p.add_argument("--broker_url", "--broker-url", help="amqp://... or embedded[://NAME]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class _Progress:
    """Feeds the request's progress statuses into a tqdm bar."""

    def __init__(self, request_id: list[str], total: int, enabled: bool, out: TextIO) -> None:
        self._ids = request_id
        self._bar = tqdm(total=total, unit="img", disable=not enabled, file=out, dynamic_ncols=True)
        self._lock = threading.Lock()

    def __call__(self, status: StatusMessage) -> None:
        if not self._ids or status.request_id != self._ids[0] or status.action is not Action.PROGRESS:
            return
        message = status.message if isinstance(status.message, dict) else {}
        with self._lock:
            self._bar.n = int(message.get("n_written", self._bar.n))
            self._bar.refresh()

    def close(self) -> None:
        with self._lock:
            self._bar.close()


def write_main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``std-daq write``: exit 0 when the file is complete, 1 when the request failed or was
    interrupted, 2 for a bad command line or an unreachable writer agent."""
    args = write_parser().parse_args(argv)
    try:
        body = build_request(args)
        tag = resolve_detector(args.detector)
        transport = make_transport(args.broker_url)
    except (CliError, ConnectionError, ValueError) as exc:
        print(f"std-daq write: {exc}", file=err)
        return 2
    ids: list[str] = []
    progress = _Progress(ids, args.n_images, not args.no_progress, err)
    aggregator = StatusAggregator(transport, tag)
    aggregator.add_listener(progress)
    try:
        aggregator.start()
        client = BrokerClient(transport, tag)
        try:
            ids.append(client.request(body))
        except NoRouteError:
            where = getattr(transport, "where", None) or getattr(transport, "broker_url", "the broker")
            print(f"std-daq write: no writer agent serves detector {tag!r} on {where}", file=err)
            return 2
        done = _wait(aggregator, client, ids[0], err)
    finally:
        progress.close()
        aggregator.stop()
        transport.close()
    failed = done["status"] is Action.FAIL
    for source, reports in done["services"].items():
        action, message = reports[-1]
        if action is Action.FAIL:
            print(f"std-daq write: {source}: {message}", file=err)
        else:
            print(json.dumps(message, indent=1) if isinstance(message, dict) else message, file=out)
    return 1 if failed else 0


def _wait(
    aggregator: StatusAggregator, client: BrokerClient, request_id: str, err: TextIO
) -> dict[str, Any]:
    """Wait for the request's end; the first Ctrl-C kills it (and keeps waiting), a second one quits."""
    try:
        return aggregator.wait_for_complete(request_id)
    except KeyboardInterrupt:
        print("\nstd-daq write: killing the request (Ctrl-C again to stop waiting)", file=err)
        client.kill(request_id)
        return aggregator.wait_for_complete(request_id)


def listen_main(argv: list[str] | None = None) -> int:
    """``std-daq listen [TAG]``: one line per status update of the requests of TAG (default: all)."""
    p = argparse.ArgumentParser(prog="std-daq listen", description=listen_main.__doc__)
    p.add_argument("tag", nargs="?", default="#", help="detector / service tag (default: every tag)")
    p.add_argument("--broker_url", "--broker-url", help="amqp://... or embedded[://NAME]")
    args = p.parse_args(argv)
    try:
        run_listener(args.broker_url, args.tag)
    except ConnectionError as exc:
        print(f"std-daq listen: {exc}", file=sys.stderr)
        return 2
    return 0
