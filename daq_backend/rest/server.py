"""Serving the REST API: ``std-daq rest CONFIG`` on its own, or inside ``std-daq up`` (thread or process).

``RestService`` wires everything (broker transport — starting an embedded broker hub if none runs —,
detector control, stats from the supervisor's status file, preview from the image ring) and serves it
with uvicorn in a thread; ``rest_main`` is its thin command line (``std-daq up`` runs it as a process
of the detector's ``topology``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from daq_backend.auth import TOKEN_ENV, listen_problem, server_token
from daq_backend.broker import EmbeddedBrokerHub, Transport, make_transport, resolve_broker_url
from daq_backend.broker.embedded_hub import hub_is_running
from daq_backend.broker.transport import DEFAULT_EMBEDDED_NAME, EMBEDDED
from daq_backend.config import DetectorConfig, load_config
from daq_backend.control.base import DetectorControl
from daq_backend.rest.app import create_app
from daq_backend.rest.backend import DaqBackend, PreviewProvider
from daq_backend.rest.dashboard import close_dashboard
from daq_backend.rest.stats_summary import status_file_stats
from daq_backend.writer.roots import add_output_root_option

_logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
CONTROL_KINDS = ("simulated", "sls", "none")


class RestServer:
    """uvicorn serving ``app`` in a daemon thread; the socket is bound in :meth:`start`, so a busy
    port fails there with a clear error and port 0 picks a free one (see :attr:`port`)."""

    def __init__(
        self, app: FastAPI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "warning"
    ) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.log_level = log_level
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (kept after ``stop()``)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> RestServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"REST API cannot listen on {self.host}:{self.requested_port}: {exc.strerror}"
            ) from None
        sock.listen(128)
        self._socket = sock
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app, log_level=self.log_level, lifespan="off", timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"rest-{self.port}", daemon=True
        )
        self._thread.start()
        server, thread = self._server, self._thread
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"REST API on {self.host}:{self.requested_port} did not start")
            time.sleep(0.01)
        _logger.info("REST API listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        close_dashboard(self.app)  # open event streams end now instead of holding the shutdown
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._server = None

    def __enter__(self) -> RestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- wiring --------------------------------------------------------------------------------------


@dataclass
class RestOptions:
    """What ``std-daq rest`` needs; the defaults serve the seed's README examples as written."""

    config_path: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    broker_url: str | None = None
    tag: str | None = None
    detector_control: str = "simulated"
    detector_hosts: list[str] = field(default_factory=list)
    sls_shm_id: int | None = None
    configure_udp: bool = False
    aliases: list[str] = field(default_factory=list)
    output_roots: list[Path] | None = None
    check_filesystem: bool = True
    log_level: str = "warning"
    #: file holding the token commands need (None: ``STD_DAQ_TOKEN``, else no token)
    token_file: Path | None = None


def make_control(kind: str, config: DetectorConfig, options: RestOptions) -> DetectorControl | None:
    """The detector control ``kind`` for ``config`` (``none``: the API runs without one)."""
    if kind == "none":
        return None
    if kind == "simulated":
        from daq_backend.control.simulated import SimulatedDetectorControl

        return SimulatedDetectorControl(config)
    if kind == "sls":
        from daq_backend.control.sls import SlsDetectorControl

        name = config.detector_name
        if not options.detector_hosts:
            raise ValueError("--detector-host is required with --detector-control sls (one per module)")
        # slsdet's shared-memory id must be unique per detector on this host: derived from the name
        shm_id = (
            options.sls_shm_id if options.sls_shm_id is not None else 1000 + zlib.crc32(name.encode()) % 9000
        )
        return SlsDetectorControl(
            config.detector_name, config.detector_type.value, options.detector_hosts, shm_id
        )
    raise ValueError(f"--detector-control: {kind!r} is not one of {', '.join(CONTROL_KINDS)}")


def image_ring_preview(config: DetectorConfig | Callable[[], DetectorConfig]) -> PreviewProvider:
    """PNG of the newest image of this detector's ring (404 from the API while there is none).
    ``config``: the detector's config, or where to get the current one (it may be changed live)."""
    from daq_backend.stream.preview import preview_png_bytes

    def provider() -> bytes:
        current = config() if callable(config) else config
        try:
            return preview_png_bytes(current)
        except FileNotFoundError as exc:
            raise LookupError(
                f"the image ring of {current.detector_name} does not exist (is the readout up?)"
            ) from exc

    return provider


def follow_config(
    controls: Sequence[DetectorControl], config: DetectorConfig, configure_udp: bool
) -> list[str]:
    """After a new config went live: the simulated detector sends its new geometry to the new ports;
    a real one is pointed at them when the API was started with ``--configure-udp``. Returns what
    could not follow."""
    from daq_backend.control.base import DetectorStateError, ParameterError
    from daq_backend.control.simulated import SimulatedDetectorControl

    problems = []
    for control in {id(c): c for c in controls}.values():
        if getattr(control, "name", None) != config.detector_name:
            continue
        try:
            if isinstance(control, SimulatedDetectorControl):
                control.config = config
                control.configure_receiver(control.destination[0], config.start_udp_port)
            elif configure_udp:
                control.configure_receiver(config.udp_host, config.start_udp_port)
        except (DetectorStateError, ParameterError, ConnectionError, RuntimeError) as exc:
            problems.append(f"the detector was not pointed at port {config.start_udp_port}: {exc}")
    return problems


def supervisor_apply(config: DetectorConfig, controls: Sequence[DetectorControl],
                     configure_udp: bool) -> Callable[[DetectorConfig], str]:
    """How this API applies a config: through the supervisor of the detector (``std-daq up``), then
    the detector control follows. Returns the supervisor's message saying it is live."""
    from daq_backend.reconfigure import SupervisorClient

    client = SupervisorClient(config.detector_name)

    def apply(new: DetectorConfig) -> str:
        result = client.apply(new)
        problems = follow_config(controls, new, configure_udp)
        return "; ".join([result.message, *problems])

    return apply


class RestService:
    """The whole API process: embedded hub (only if needed), transport, controls, backend, server."""

    def __init__(self, options: RestOptions) -> None:
        self.options = options
        self.hub: EmbeddedBrokerHub | None = None
        self.transport: Transport | None = None
        self.backend: DaqBackend | None = None
        self.server: RestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def _transport(self) -> Transport:
        url = resolve_broker_url(self.options.broker_url)
        name = None
        if url == EMBEDDED:
            name = DEFAULT_EMBEDDED_NAME
        elif url.startswith(f"{EMBEDDED}://"):
            name = url.removeprefix(f"{EMBEDDED}://").strip("/") or DEFAULT_EMBEDDED_NAME
        if name is not None and not hub_is_running(name):
            hub = EmbeddedBrokerHub(name)
            try:
                hub.start()
                self.hub = hub
            except RuntimeError:  # another process started it meanwhile: use theirs
                _logger.info("embedded broker hub %r started elsewhere", name)
        return make_transport(url)

    def start(self) -> RestService:
        opts = self.options
        config = load_config(opts.config_path)
        token = server_token(opts.token_file)  # a TokenError (ValueError) names the problem
        problem = listen_problem(opts.host, token)
        if problem is not None:
            raise ValueError(problem)
        try:
            self.transport = self._transport()
            control = make_control(opts.detector_control, config, opts)
            controls: dict[str, DetectorControl] = {}
            if control is not None:
                for key in [config.detector_name, config.detector_type.value, *opts.aliases]:
                    controls.setdefault(key, control)
                if opts.configure_udp:
                    try:
                        control.configure_receiver(config.udp_host, config.start_udp_port)
                    except (ConnectionError, RuntimeError, ValueError) as exc:
                        _logger.warning("could not point the detector at %s: %s", config.udp_host, exc)
            self.backend = DaqBackend(
                config,
                self.transport,
                controls=controls,
                stats=status_file_stats(config.detector_name),
                preview=image_ring_preview(self._current_config),
                output_roots=opts.output_roots,
                check_filesystem=opts.check_filesystem,
                on_config_change=supervisor_apply(config, list(controls.values()), opts.configure_udp),
                tag=opts.tag,
                owns_transport=True,
                owns_controls=True,
                status_queue=(f"std-daq-status-{opts.tag or config.detector_name}-rest@"
                              f"{socket.gethostname()}:{opts.port}" if opts.port else None),
            ).start()
            app = create_app(self.backend, token)
            self.server = RestServer(app, opts.host, opts.port, opts.log_level).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _current_config(self) -> DetectorConfig:
        assert self.backend is not None
        return self.backend.config

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        elif self.transport is not None:
            self.transport.close()
        self.transport = None
        if self.hub is not None:
            self.hub.stop()
            self.hub = None

    def __enter__(self) -> RestService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="std-daq rest",
        description="Serve the std-daq REST API (seed endpoints, request status, admin) of one detector.",
    )
    p.add_argument("config", type=Path, help="detector JSON file")
    p.add_argument(
        "--rest-port", "--rest_port", dest="port", type=int, default=DEFAULT_PORT, help="default 5000"
    )
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--token-file", "--token_file", dest="token_file", type=Path, default=None,
                   help=f"file holding the token commands need (default: env {TOKEN_ENV}, else no token)")
    p.add_argument(
        "--broker_url",
        "--broker-url",
        dest="broker_url",
        default=None,
        help="amqp://... or embedded[://NAME] (default: env BROKER_URL, else BROKER_HOST, else embedded)",
    )
    p.add_argument("--tag", default=None, help="broker tag of the writer agent (default: the detector name)")
    p.add_argument("--detector-control", "--detector_control", choices=CONTROL_KINDS, default="simulated")
    p.add_argument(
        "--detector-host",
        "--detector_host",
        dest="detector_hosts",
        action="append",
        default=[],
        help="host[:port] of a detector module for slsdet (repeat per module, or join with '+')",
    )
    p.add_argument("--sls-shm-id", "--sls_shm_id", dest="sls_shm_id", type=int, default=None)
    p.add_argument(
        "--configure-udp",
        "--configure_udp",
        dest="configure_udp",
        action="store_true",
        help="point the detector's UDP at udp_host:start_udp_port of the config at start-up",
    )
    p.add_argument(
        "--alias", action="append", default=[], help="another name for the detector in /detector/<name>"
    )
    add_output_root_option(p)
    p.add_argument(
        "--no-filesystem-check",
        dest="check_filesystem",
        action="store_false",
        help="do not check output folders here (the writer runs on another host)",
    )
    p.add_argument(
        "--log_level", "--log-level", dest="log_level", default="INFO", type=str.upper,
        choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"],
    )  # fmt: skip
    return p


def options_from_args(args: argparse.Namespace) -> RestOptions:
    hosts = [h for item in args.detector_hosts for h in item.split("+") if h.strip()]
    return RestOptions(
        config_path=args.config,
        host=args.host,
        port=args.port,
        broker_url=args.broker_url,
        tag=args.tag,
        detector_control=args.detector_control,
        detector_hosts=hosts,
        sls_shm_id=args.sls_shm_id,
        configure_udp=args.configure_udp,
        aliases=list(args.alias),
        output_roots=args.output_roots,
        check_filesystem=args.check_filesystem,
        log_level=args.log_level.lower(),
        token_file=args.token_file,
    )


def rest_main(argv: Sequence[str] | None = None) -> int:
    """``std-daq rest CONFIG``: serve the API until SIGTERM / Ctrl-C."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = RestService(options_from_args(args))
    try:
        service.start()
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"std-daq rest: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"std-daq rest: {service.url} (OpenAPI: {service.url}/docs)", file=sys.stderr)
    try:
        done.wait()
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(rest_main())
