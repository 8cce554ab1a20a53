"""The seed's broker protocol, defined once.

Exchanges ``request`` and ``kill`` (topic) and ``status`` carry JSON bodies; the AMQP
``correlation_id`` is the request id (uuid4) and status headers are ``{action, source, message}``
with the original request body echoed. Every transport (RabbitMQ, embedded) moves exactly
these messages, so a plain pika client that knows only the seed protocol interoperates.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

REQUEST_EXCHANGE = "request"
KILL_EXCHANGE = "kill"
STATUS_EXCHANGE = "status"


class Action(str, Enum):
    """Status actions. The first three are the seed's; ``request_progress`` is ours (extra,
    ignored by seed clients) and carries ``{"n_written": int, "n_images": int}`` while a write runs."""

    START = "request_start"
    SUCCESS = "request_success"
    FAIL = "request_fail"
    PROGRESS = "request_progress"


FINAL_ACTIONS = frozenset({Action.SUCCESS, Action.FAIL})


@dataclass(frozen=True)
class Message:
    """One broker message as it travels on any transport."""

    exchange: str
    routing_key: str
    body: bytes
    correlation_id: str
    headers: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[Message], None]


class Transport(abc.ABC):
    """What the protocol needs of a message bus: topic publish and bound consumers."""

    @abc.abstractmethod
    def publish(self, message: Message) -> None:
        """Send a message; raises ``ConnectionError`` when the bus is unreachable."""

    @abc.abstractmethod
    def consume(
        self, exchange: str, binding_key: str, callback: Callback, *, exclusive_work: bool = False
    ) -> Callable[[], None]:
        """Deliver messages of ``exchange`` whose routing key matches ``binding_key`` (AMQP topic
        rules: ``*`` one word, ``#`` zero or more) to ``callback`` on a transport thread.

        ``exclusive_work=True`` means one message at a time (prefetch 1, manual ack: the next
        delivery waits until the callback returned). Returns a function that cancels the consumer.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every consumer and release connections."""
