"""The seed's broker protocol, defined once.

Exchanges ``request`` and ``kill`` (topic) and ``status`` carry JSON bodies; the AMQP
``correlation_id`` is the request id (uuid4) and status headers are ``{action, source, message}``
with the original request body echoed. Every transport (RabbitMQ, embedded) moves exactly
these messages, so a plain pika client that knows only the seed protocol interoperates.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

REQUEST_EXCHANGE = "request"
KILL_EXCHANGE = "kill"
STATUS_EXCHANGE = "status"

#: Header of a request message: the time (seconds since the epoch, ``time.time()``) by which a
#: service must have started it. A service that receives it later refuses it (``request_fail``
#: "expired: ...") instead of running a request whose client has given up; a request without it
#: never expires (seed clients).
DEADLINE_HEADER = "deadline"
#: Seconds within which an operation of a client that must answer a person (the REST API, ``std-daq
#: write``) gives up on an unreachable broker: a publish raises ``ConnectionError`` within this time,
#: and the request it carried gets this as its deadline, so it can never run later.
UNREACHABLE_BOUND = 5.0


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
    #: delivered before to a consumer that did not acknowledge it (e.g. its process died running it)
    redelivered: bool = False


Callback = Callable[[Message], None]


class NoRouteError(ConnectionError):
    """A ``mandatory`` publish found no consumer bound for its routing key (e.g. no service
    listens on that tag). A ``ConnectionError`` so callers handling an unreachable bus handle it too."""


@functools.lru_cache(maxsize=4096)
def topic_matches(binding_key: str, routing_key: str) -> bool:
    """AMQP topic rule: dot-separated words, ``*`` matches exactly one word, ``#`` zero or more.

    Defined here so the embedded transport routes exactly like RabbitMQ (an empty key has no words).
    """
    pattern = binding_key.split(".") if binding_key else []
    words = routing_key.split(".") if routing_key else []

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(words)
        if pattern[i] == "#":
            return match(i + 1, j) or (j < len(words) and match(i, j + 1))
        return j < len(words) and pattern[i] in ("*", words[j]) and match(i + 1, j + 1)

    return match(0, 0)


class Transport(abc.ABC):
    """What the protocol needs of a message bus: topic publish and bound consumers."""

    #: where the bus is, for messages (never with credentials)
    where: str = "?"

    @property
    def connected(self) -> bool:
        """True while the transport holds a working connection to the bus."""
        return True

    @property
    def last_error(self) -> str:
        """Why the last connection attempt or operation failed ("no error" if none did)."""
        return "no error"

    @abc.abstractmethod
    def publish(self, message: Message, *, mandatory: bool = False, timeout: float | None = None) -> None:
        """Send a message and return once the bus has taken it.

        While the bus is unreachable the publish is retried for a bounded, configurable time, then
        ``ConnectionError`` is raised. ``mandatory=True`` (used for requests) also requires at least
        one bound consumer; otherwise it is retried for a while (a service may be re-binding after a
        broker restart) and then ``NoRouteError`` is raised, so a request never vanishes silently.
        ``timeout``: the whole publish (reconnect and route retries) gives up after this many seconds;
        a message not taken by then is never sent later.
        """

    @abc.abstractmethod
    def consume(
        self, exchange: str, binding_key: str, callback: Callback, *, exclusive_work: bool = False,
        queue: str | None = None,
    ) -> Callable[[], None]:
        """Deliver messages of ``exchange`` whose routing key matches ``binding_key`` (AMQP topic
        rules: ``*`` one word, ``#`` zero or more) to ``callback`` on a transport thread.

        ``exclusive_work=True`` means one message at a time (prefetch 1, manual ack: the next
        delivery waits until the callback returned). ``queue``: a name that stays the consumer's
        across restarts of its process (e.g. the service's tag and name): what arrives while the
        process is down waits for the restarted one instead of a dead consumer's queue (RabbitMQ
        keeps a consumer's queue through a lost connection); None: a queue of its own. The embedded
        broker routes only to live consumers and ignores it. Returns a function that cancels the
        consumer.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every consumer and release connections."""
