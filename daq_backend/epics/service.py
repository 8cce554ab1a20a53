"""The EPICS writer as a broker service (same request / kill / status protocol as the detector writer).

A request body is an ``EpicsWriteRequest``; ``request_success`` carries the writer's summary
(``output_file``, ``n_points`` per channel, ``datasets``: per channel its HDF5 ``dataset`` path,
``dtype_numpy`` ("string" for text) and ``shape``, the buffered pulse ids used), ``request_fail`` the error
text (``"<field>: <problem>"`` for bad requests, ``"killed after writing k of n channels ..."`` for a
kill). Progress (``request_progress``) is ``{"n_written": channels done, "n_channels": total}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from daq_backend.broker import BrokerService, RequestContext, Transport, make_transport
from daq_backend.epics.store import Store, make_store
from daq_backend.epics.writer import EpicsWriter, WriterSettings

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "epics_writer"


class EpicsWriterService:
    """Serves EPICS write requests arriving on ``tag`` (default: the service name, as in the seed)."""

    def __init__(
        self,
        transport: Transport,
        store: Store,
        *,
        service_name: str = DEFAULT_SERVICE_NAME,
        tag: str | None = None,
        settings: WriterSettings | None = None,
    ) -> None:
        self.writer = EpicsWriter(store, settings)
        self.service = BrokerService(transport, service_name, tag or service_name, self._on_request)

    def _on_request(self, ctx: RequestContext) -> dict[str, Any]:
        def progress(n_written: int, n_channels: int) -> None:
            ctx.publish_progress({"n_written": n_written, "n_channels": n_channels})

        return self.writer.write(ctx.request, ctx.killed, progress)

    def start(self) -> None:
        self.service.start()

    def stop(self) -> None:
        self.service.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``std-daq epics-writer [--redis-url URL] [--broker-url URL] [--service-name N] [--tag T] ...``;
    runs until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="std-daq epics-writer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=None, help="redis://host:port (default: env REDIS_HOST)")
    parser.add_argument("--broker-url", default=None, help="amqp://... or embedded[://NAME] (default: env)")
    parser.add_argument("--service-name", default=os.environ.get("SERVICE_NAME", DEFAULT_SERVICE_NAME))
    parser.add_argument("--tag", default=None, help="request routing key (default: the service name)")
    parser.add_argument("--stream-prefix", default="", help="the buffer's stream_prefix")
    parser.add_argument("--max-pulse-id-mismatch", type=int, default=WriterSettings.max_pulse_id_mismatch)
    parser.add_argument("--stop-wait", type=float, default=WriterSettings.stop_wait_s, help="seconds")
    parser.add_argument(
        "--log-level", default="INFO", choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        store = make_store(args.redis_url)
        transport = make_transport(args.broker_url)
    except (ValueError, ConnectionError) as exc:
        parser.error(str(exc))
    if store.embedded is not None:
        log.warning("No Redis given: serving from an empty embedded store at %s", store.url)
    settings = WriterSettings(
        stream_prefix=args.stream_prefix,
        max_pulse_id_mismatch=args.max_pulse_id_mismatch,
        stop_wait_s=args.stop_wait,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    service = EpicsWriterService(
        transport, store, service_name=args.service_name, tag=args.tag, settings=settings
    )
    service.start()
    try:
        stop.wait()
    finally:
        service.stop()
        transport.close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
