"""``std-daq write`` (one write request, a progress bar, the result) and ``std-daq listen``.

``write`` reaches the writer agent of a detector through the broker: RabbitMQ with ``--broker-url``
(or ``BROKER_URL`` / ``BROKER_HOST``), else the embedded hub that ``std-daq up`` runs; with ``--url``
it goes through the DAQ's REST API instead (another host: the token of ``--token-file`` or
``STD_DAQ_TOKEN`` is sent, and the API's answers, e.g. 401 or 409, are printed). The detector
(= the agent's tag) is ``--detector``, else ``STD_DAQ_DETECTOR``, else the only detector that is up
on this host. Nothing waits a fixed time: the command ends with the request. Ctrl-C, SIGTERM (e.g.
from ``timeout``) and SIGHUP (the terminal closed) kill the request (the file is closed cleanly) and
wait for the writer to confirm; a second one stops waiting. While no image comes the command says so
(the detector may not be sending yet; the request takes the *next* N images).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
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
from daq_backend.broker.protocol import UNREACHABLE_BOUND
from daq_backend.writer.request import RequestError, parse_write_request

DETECTOR_ENV = "STD_DAQ_DETECTOR"
#: seconds without an image (or without the request being started) before ``write`` says so
NO_IMAGE_HINT = 10.0
#: seconds to wait for the writer to confirm a kill before giving up waiting
KILL_WAIT = 30.0


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
        raise CliError(
            f"no detector is up on this host (no `std-daq up` has a status file in {ipc.ipc_dir()}): start "
            "one with `std-daq up CONFIG` (same STD_DAQ_IPC_DIR); a detector served on RabbitMQ from "
            "elsewhere needs --broker-url URL and --detector NAME"
        )
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
    elif os.path.lexists(body["output_file"]):
        raise CliError(f"{body['output_file']} already exists: --overwrite replaces it")
    try:
        parse_write_request(body, check_filesystem=False)
    except RequestError as exc:
        raise CliError(str(exc)) from None
    return body


def write_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="std-daq write", description="Write the next N images of a detector "
                                "to an HDF5 file (one request to its writer agent).")
    p.add_argument("--n-images", "--n_images", type=int, required=True, help="number of images")
    p.add_argument("--output", "--output-file", "--output_file", required=True,
                   help="HDF5 file to create, inside the DAQ's output roots (by default its data root "
                        "$XDG_DATA_HOME/std-daq, i.e. ~/.local/share/std-daq)")
    p.add_argument("--metadata", help="JSON object stored as attributes of /entry")
    p.add_argument("--start-id", "--start_id", type=int,
                   help="first image id (taken from the RAM buffer if still there)")
    p.add_argument("--compression", choices=["none", "bitshuffle-lz4"], default="none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file this DAQ wrote")
    p.add_argument("--timeout", type=float, help="give up when no image arrives for this many seconds")
    p.add_argument("--detector",
                   help=f"detector (writer agent tag); default ${DETECTOR_ENV}, else the one that is up")
    p.add_argument("--broker_url", "--broker-url", help="amqp://... or embedded[://NAME]")
    p.add_argument("--url", help="send the request through the DAQ's REST API at this URL "
                   "(e.g. http://daq-host:5000) instead of the broker")
    p.add_argument("--token-file", "--token_file", dest="token_file",
                   help="with --url: file holding the API's token (default: env STD_DAQ_TOKEN)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class _Progress:
    """Follows the request's statuses: feeds progress into a tqdm bar, remembers whether the request
    was started and when the last image came."""

    def __init__(self, request_id: str, total: int, enabled: bool, out: TextIO) -> None:
        self.request_id = request_id
        self._out = out
        self._bar = tqdm(total=total, unit="img", disable=not enabled, file=out, dynamic_ncols=True)
        self._lock = threading.Lock()
        self.started = False
        self.n_written = 0
        self.last_change = time.monotonic()

    def __call__(self, status: StatusMessage) -> None:
        if status.request_id != self.request_id:
            return
        with self._lock:
            if status.action is Action.START and not self.started:
                self.started, self.last_change = True, time.monotonic()
            if status.action is not Action.PROGRESS:
                return
            self.started = True
            message = status.message if isinstance(status.message, dict) else {}
            n = int(message.get("n_written", self._bar.n))
            if n != self.n_written:
                self.n_written, self.last_change = n, time.monotonic()
            self._bar.n = n
            self._bar.refresh()

    def write(self, text: str) -> None:
        with self._lock:
            tqdm.write(text, file=self._out)  # above the bar, which is redrawn below

    def close(self) -> None:
        with self._lock:
            self._bar.close()


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP while ``write`` runs (a KeyboardInterrupt, so it stops the wait)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """SIGINT, SIGTERM and SIGHUP raise :class:`_Interrupted`, except while ``deferred()``: then the
    signal waits until the block ends (the request is being published: its kill must follow it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._deferred = False
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self._deferred:
            self._pending = signum
            return
        raise _Interrupted(signum)

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold the signals back for the block (``raise_pending`` delivers one that came)."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def raise_pending(self) -> None:
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise _Interrupted(signum)


def write_main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``std-daq write``: exit 0 when the file is complete, 1 when the request failed or was
    interrupted, 2 for a bad command line or an unreachable writer agent."""
    args = write_parser().parse_args(argv)
    if args.url:
        return _write_rest(args, out, err)
    try:
        body = build_request(args)
        tag = resolve_detector(args.detector)
        transport = make_transport(args.broker_url)
    except (CliError, ConnectionError, ValueError) as exc:
        print(f"std-daq write: {exc}", file=err)
        return 2
    request_id = str(uuid.uuid4())
    progress = _Progress(request_id, args.n_images, not args.no_progress, err)
    aggregator = StatusAggregator(transport, tag)
    aggregator.add_listener(progress)
    client = BrokerClient(transport, tag)
    with _Signals() as signals:
        try:
            aggregator.start()
            with signals.deferred():
                try:
                    # the request must start within the bound or never (its deadline): this command
                    # gives up on it then, so it must not run later
                    client.request(body, request_id=request_id, deadline=time.time() + UNREACHABLE_BOUND,
                                   timeout=UNREACHABLE_BOUND)
                except NoRouteError:
                    print(f"std-daq write: no writer agent serves detector {tag!r} on {transport.where}",
                          file=err)
                    return 2
                except ConnectionError as exc:
                    print(f"std-daq write: broker unreachable ({exc}); the request was not sent and will "
                          "never run", file=err)
                    return 2
            done = _wait(aggregator, client, request_id, progress, tag, signals, err)
        except _Interrupted as exc:  # before the request was sent: nothing to kill
            print(f"std-daq write: {exc}: no request was sent", file=err)
            return 1
        finally:
            progress.close()
            aggregator.stop()
            transport.close()
    if done is None:
        return 1
    failed = done["status"] is Action.FAIL
    for source, reports in done["services"].items():
        action, message = reports[-1]
        if action is Action.FAIL:
            print(f"std-daq write: {source}: {message}", file=err)
        else:
            print(json.dumps(message, indent=1) if isinstance(message, dict) else message, file=out)
    return 1 if failed else 0


#: seconds between two looks at the request's state through the REST API
REST_POLL = 0.2


def _write_rest(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``std-daq write --url URL``: the same request through the REST API (``POST /write_async``,
    then ``GET /requests/{id}`` until it ended; a signal stops it with ``POST /requests/{id}/stop``)."""
    from daq_backend.auth import TokenError, read_token_file
    from std_daq_ophyd.client import StdDaqClient, StdDaqError

    try:
        body = build_request(args)
        token = read_token_file(args.token_file) if args.token_file else None
    except (CliError, TokenError) as exc:
        print(f"std-daq write: {exc}", file=err)
        return 2
    client = StdDaqClient(args.url, token=token)
    progress = tqdm(total=args.n_images, unit="img", disable=args.no_progress, file=err, dynamic_ncols=True)
    request_id: str | None = None
    try:
        with _Signals() as signals:
            try:
                with signals.deferred():
                    request_id = client.write_async(body)
                signals.raise_pending()
                last_change, n_written, hinted = time.monotonic(), 0, False
                while True:
                    status = client.request_status(request_id)
                    if status.n_written != n_written:
                        n_written, last_change, hinted = status.n_written, time.monotonic(), False
                        progress.n = n_written
                        progress.refresh()
                    if status.state.value in ("completed", "interrupted", "failed"):
                        break
                    if not hinted and time.monotonic() - last_change >= NO_IMAGE_HINT:
                        tqdm.write(f"std-daq write: no new image for {NO_IMAGE_HINT:g} s: is the detector "
                                   "sending? Ctrl-C ends the request", file=err)
                        hinted = True
                    time.sleep(REST_POLL)
            except _Interrupted as exc:
                if request_id is None:
                    print(f"std-daq write: {exc}: no request was sent", file=err)
                    return 1
                print(f"\nstd-daq write: {exc}: stopping the request", file=err)
                status = client.stop_request(request_id)
    except StdDaqError as exc:
        print(f"std-daq write: {exc}", file=err)
        return 2 if request_id is None else 1
    finally:
        progress.close()
        client.close()
    if status.state.value == "completed":
        print(json.dumps(status.result if status.result is not None else status.model_dump(mode="json"),
                         indent=1), file=out)
        return 0
    print(f"std-daq write: {status.state.value}: {status.message}", file=err)
    return 1


def _no_image_hint(progress: _Progress, tag: str) -> str:
    waited = time.monotonic() - progress.last_change
    if not progress.started:
        return (f"std-daq write: the writer agent of {tag!r} has not answered this request after "
                f"{waited:.0f} s (is the broker reachable? `std-daq status` says)")
    what = "no image yet" if progress.n_written == 0 else f"no new image for {waited:.0f} s"
    return (f"std-daq write: {what}: the request takes the next images the detector sends; is it sending "
            "(`std-daq simulate CONFIG`, or the detector started)? Ctrl-C ends the request, --timeout S "
            "ends it when no image comes for S seconds")


def _wait(aggregator: StatusAggregator, client: BrokerClient, request_id: str, progress: _Progress,
          tag: str, signals: _Signals, err: TextIO) -> dict[str, Any] | None:
    """Wait for the request's end, saying so once when no image comes; the first Ctrl-C / SIGTERM /
    SIGHUP kills it (and keeps waiting for the writer's confirmation), a second one quits."""
    hinted = False
    try:
        signals.raise_pending()
        while True:
            try:
                return aggregator.wait_for_complete(request_id, timeout=1.0)
            except TimeoutError:
                pass
            if time.monotonic() - progress.last_change >= NO_IMAGE_HINT and not hinted:
                progress.write(_no_image_hint(progress, tag))
                hinted = True
            elif time.monotonic() - progress.last_change < NO_IMAGE_HINT:
                hinted = False
    except _Interrupted as exc:
        how = "Ctrl-C" if exc.signum == signal.SIGINT else str(exc)
        print(f"\nstd-daq write: {how}: killing the request (Ctrl-C again to stop waiting)", file=err)
        client.kill(request_id)
    try:
        return aggregator.wait_for_complete(request_id, timeout=KILL_WAIT)
    except TimeoutError:
        print(f"std-daq write: the writer did not confirm the kill within {KILL_WAIT:g} s; request "
              f"{request_id} may still be running", file=err)
        return None
    except KeyboardInterrupt:
        print("std-daq write: stopped waiting for the writer's confirmation", file=err)
        return None


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
