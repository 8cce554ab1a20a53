"""``std-daq listen``: one coloured line per status update, like the seed's monitor.

Line format: ``[abcd..wxyz] [*+-] service names`` — the symbols are the services' last states
(``*`` running, ``+`` success, ``-`` fail; failures first), then the names in the same colours,
then the text of the message that caused the update when it is a failure or progress.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from daq_backend.broker.aggregator import StatusAggregator, StatusMessage
from daq_backend.broker.protocol import Action, Transport
from daq_backend.broker.transport import make_transport

_SYMBOL = {Action.START: "*", Action.PROGRESS: "*", Action.SUCCESS: "+", Action.FAIL: "-"}
_COLOUR = {Action.START: "yellow", Action.PROGRESS: "yellow", Action.SUCCESS: "green", Action.FAIL: "red"}
_ORDER = {Action.FAIL: 0, Action.START: 1, Action.PROGRESS: 1, Action.SUCCESS: 2}


def short_id(request_id: str) -> str:
    return f"{request_id[:4]}..{request_id[-4:]}"


def format_status(
    request_id: str, services: dict[str, list[tuple[Action, Any]]], latest: StatusMessage | None = None
) -> Text:
    """The listener line for one request (a rich ``Text``; plain text when printed to a file)."""
    states = sorted((_ORDER[reports[-1][0]], name, reports[-1][0]) for name, reports in services.items())
    line = Text(f"[{short_id(request_id)}] [")
    for _, _, action in states:
        line.append(_SYMBOL[action], style=f"black on {_COLOUR[action]}")
    line.append("]")
    for _, name, action in states:
        line.append(f" {name}", style=_COLOUR[action])
    if latest is not None and latest.action in (Action.FAIL, Action.PROGRESS):
        line.append(f"  {latest.source}: {latest.message}", style=_COLOUR[latest.action])
    return line


class StatusListener:
    """Prints ``format_status`` for every status message of ``tag`` to ``out``."""

    def __init__(self, transport: Transport, tag: str = "#", out: TextIO = sys.stdout) -> None:
        self.aggregator = StatusAggregator(transport, tag)
        self.aggregator.add_listener(self._on_status)
        self._console = Console(file=out, highlight=False, soft_wrap=True)

    def start(self) -> None:
        self.aggregator.start()

    def stop(self) -> None:
        self.aggregator.stop()

    def _on_status(self, message: StatusMessage) -> None:
        services = self.aggregator.status(message.request_id)["services"]
        self._console.print(format_status(message.request_id, services, message))


def run_listener(
    broker_url: str | None = None,
    tag: str = "#",
    out: TextIO = sys.stdout,
    stop: threading.Event | None = None,
) -> None:
    """Body of ``std-daq listen``: print statuses until Ctrl-C (or until ``stop`` is set)."""
    transport = make_transport(broker_url)
    listener = StatusListener(transport, tag, out)
    try:
        listener.start()
        print(f"Listening for status messages on tag {tag!r}. Ctrl-C to stop.", file=out, flush=True)
        (stop or threading.Event()).wait()  # interruptible by Ctrl-C on POSIX
    except KeyboardInterrupt:
        print(file=out)
    finally:
        listener.stop()
        transport.close()
