"""One delivery thread per consumer, shared by both transports.

User callbacks never run on a transport's I/O thread: a callback that blocks (a service running a
request) must not stop heartbeats, acks, publishes or the delivery of kills to another consumer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from daq_backend.broker.protocol import Callback, Message

_logger = logging.getLogger(__name__)

_STOP = object()


class ConsumerWorker:
    """Runs ``callback`` for each delivered message, in order, on its own daemon thread.

    ``on_done(token)`` is called after every callback (also a failing one): the transports use it
    to ack an ``exclusive_work`` delivery, which is what lets the next one in.
    """

    def __init__(self, name: str, callback: Callback, on_done: Callable[[Any], None] | None = None) -> None:
        self._callback = callback
        self._on_done = on_done
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, message: Message, token: Any = None) -> None:
        self._queue.put((message, token))

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the callback in progress (waiting at most ``timeout``) and drop queued messages."""
        self._stopped.set()
        self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._stopped.is_set():
                return
            message, token = item
            try:
                self._callback(message)
            except Exception:
                _logger.exception(
                    "Consumer callback failed on %s/%s (id %s)",
                    message.exchange,
                    message.routing_key,
                    message.correlation_id,
                )
            finally:
                if self._on_done is not None:
                    try:
                        self._on_done(token)
                    except Exception:
                        _logger.exception("Acknowledging delivery %r failed", token)
