"""RabbitMQ transport (pika), for production set-ups spanning several hosts.

pika's ``BlockingConnection`` is not thread-safe, so one thread owns the connection and every
other thread hands it work through ``add_callback_threadsafe``. That thread also survives broker
restarts: it reconnects, re-declares the exchanges and re-binds every consumer's queue, while
publishers wait (bounded) for it. Publishes use publisher confirms, so ``publish`` returning means
the broker has the message, and ``mandatory`` publishes learn when nobody is bound to receive them.

Each consumer's queue outlives a lost connection (it is deleted only when the consumer is cancelled,
or by the broker after ``QUEUE_EXPIRES_S`` without a consumer): what is published for a consumer
while its connection is down (a status sent by a service that reconnected first, a request) waits
for it instead of being dropped. A request that waited past its deadline is refused by the service.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import decimal
import functools
import itertools
import json
import logging
import math
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.data
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import AMQPError, ChannelClosedByBroker, NackError, UnroutableError

from daq_backend.broker.dispatch import ConsumerWorker
from daq_backend.broker.protocol import (
    KILL_EXCHANGE,
    REQUEST_EXCHANGE,
    STATUS_EXCHANGE,
    Callback,
    Message,
    NoRouteError,
    Transport,
)

_logger = logging.getLogger(__name__)
# pika logs every failed reconnect attempt as an error (with a traceback); this module reports a lost
# connection, the reconnect and what failed (``last_error``, /health) itself
for _name in ("pika.adapters", "pika.connection"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
EXCHANGE_TYPE = "topic"
# Header values AMQP tables cannot carry exactly (floats) travel as JSON in this extra header;
# seed clients ignore it and read the approximate native ``message`` header.
JSON_HEADERS_KEY = "x-std-daq-json"

_PRECONDITION_FAILED = 406
_POLL_S = 0.2
#: AMQP heartbeat proposed when the URL sets none (RabbitMQ's own default is 60 s): a connection
#: that silently stops carrying data (a network partition) is noticed within 2 * (this + 5) s
DEFAULT_HEARTBEAT_S = 5
#: seconds a consumer's queue survives without its consumer (a connection that does not come back)
QUEUE_EXPIRES_S = 600
#: messages a consumer's queue keeps while its consumer is away (the oldest are dropped beyond it)
QUEUE_MAX_LENGTH = 100_000


class _ConnectionLost(ConnectionError):
    """The connection went away while an operation was queued on it (internal, retried)."""


@dataclass(eq=False)
class _Consumer:
    key: int
    exchange: str
    binding_key: str
    exclusive_work: bool
    queue: str
    worker: ConsumerWorker | None = None
    channel: BlockingChannel | None = None
    generation: int = 0


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _resolve(future: concurrent.futures.Future[Any], value: Any) -> None:
    # InvalidStateError: lost a race with the disconnect handler, which already failed it.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_result(value)


def _fail(future: concurrent.futures.Future[Any], exc: BaseException) -> None:
    # InvalidStateError: lost a race with the connection thread, which already resolved it.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_exception(exc)


def _amqp_exact(value: Any) -> bool:
    """True if pika's field-table codec carries ``value`` unchanged (it has no float type)."""
    if value is None or isinstance(value, (str, bool)):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, list):
        return all(_amqp_exact(item) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(key, str) and len(key.encode()) < 256 and _amqp_exact(item)
            for key, item in value.items()
        )
    return False


def _amqp_approximate(value: Any) -> Any:
    """Nearest AMQP-encodable value, for seed clients that only read the native headers."""
    if isinstance(value, float):
        if math.isfinite(value):
            number = decimal.Decimal(repr(value))
            try:
                pika.data.encode_value([], number)
                return number
            except (struct.error, OverflowError):
                return repr(value)
        return repr(value)
    if isinstance(value, dict):
        return {str(key): _amqp_approximate(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_amqp_approximate(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return str(value)
    return value


def encode_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """Message headers as an AMQP table; raises ``TypeError`` for values JSON cannot carry."""
    if _amqp_exact(headers):
        return dict(headers)
    try:
        json_text = json.dumps(headers)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Message headers must be JSON-serialisable: {exc}") from exc
    table = {str(key): _amqp_approximate(value) for key, value in headers.items()}
    table[JSON_HEADERS_KEY] = json_text
    return table


def _from_amqp(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(key): _from_amqp(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_amqp(item) for item in value]
    return value


def decode_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """AMQP headers back to plain JSON-like values (exact when we sent them ourselves)."""
    if not headers:
        return {}
    json_text = headers.get(JSON_HEADERS_KEY)
    if json_text is not None:
        try:
            decoded = json.loads(json_text)
            if isinstance(decoded, dict):
                return decoded
        except ValueError:
            _logger.warning("Ignoring undecodable %s header", JSON_HEADERS_KEY)
    return {str(key): _from_amqp(value) for key, value in headers.items() if key != JSON_HEADERS_KEY}


class RabbitMQTransport(Transport):
    """The broker protocol over a RabbitMQ server.

    ``connect_timeout`` bounds the first connection (which must succeed: a wrong URL is reported at
    once); ``reconnect_timeout`` bounds how long a publish (or consume) waits for a lost connection
    to come back before raising ``ConnectionError``; ``route_timeout`` how long a mandatory publish
    keeps retrying while no consumer is bound; ``retry_interval`` the first reconnect delay (it
    doubles up to 5 s).
    """

    def __init__(
        self,
        broker_url: str = DEFAULT_URL,
        *,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 30.0,
        route_timeout: float = 5.0,
        retry_interval: float = 0.5,
    ) -> None:
        self.broker_url = broker_url
        try:
            self._params = pika.URLParameters(broker_url)
        except ValueError as exc:
            raise ValueError(f"Invalid RabbitMQ URL {broker_url!r}: {exc}") from exc
        self._params.connection_attempts = 1
        if "heartbeat=" not in broker_url:
            self._params.heartbeat = DEFAULT_HEARTBEAT_S
        self._params.socket_timeout = connect_timeout
        self._params.stack_timeout = connect_timeout
        self._params.blocked_connection_timeout = reconnect_timeout
        self.where = f"{self._params.host}:{self._params.port} (vhost {self._params.virtual_host!r})"

        self._reconnect_timeout = reconnect_timeout
        self._route_timeout = route_timeout
        self._retry_interval = retry_interval

        self._lock = threading.Lock()
        self._connection: BlockingConnection | None = None
        self._publish_channel: BlockingChannel | None = None
        self._declared: set[str] = set()
        self._generation = 0
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._consumers: dict[int, _Consumer] = {}
        self._keys = itertools.count()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._last_error = "no error"
        self._closed = False

        self._thread = threading.Thread(target=self._run, name=f"rabbitmq-{self.where}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise ConnectionError(
                f"Cannot connect to RabbitMQ at {self.where}: {_describe(self._startup_error)}. "
                "Is the broker running? Check --broker_url / BROKER_URL / BROKER_HOST, "
                "or use the embedded broker (--broker_url embedded)."
            ) from self._startup_error

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def generation(self) -> int:
        """Number of connections made so far (1 + reconnects); lets tests see a reconnect."""
        return self._generation

    def publish(self, message: Message, *, mandatory: bool = False, timeout: float | None = None) -> None:
        properties = pika.BasicProperties(
            correlation_id=message.correlation_id or None,
            headers=encode_headers(message.headers),
        )
        attempt = functools.partial(self._publish_now, message, properties, mandatory)
        what = f"message to exchange {message.exchange!r} with routing key {message.routing_key!r}"
        deadline = None if timeout is None else time.monotonic() + timeout
        route_deadline: float | None = None
        while True:
            routed = self._call(attempt, what, deadline)
            if routed:
                return
            now = time.monotonic()
            route_deadline = route_deadline if route_deadline is not None else now + self._route_timeout
            if deadline is not None:
                route_deadline = min(route_deadline, deadline)
            if now + 0.1 >= route_deadline:  # no time left for another attempt
                raise NoRouteError(
                    f"No consumer is bound to exchange {message.exchange!r} for routing key "
                    f"{message.routing_key!r} on RabbitMQ at {self.where} (retried for "
                    f"{self._route_timeout:g} s): is a service listening on that tag?"
                )
            self._closing.wait(0.1)

    def consume(
        self, exchange: str, binding_key: str, callback: Callback, *, exclusive_work: bool = False,
        queue: str | None = None,
    ) -> Callable[[], None]:
        consumer = _Consumer(
            key=next(self._keys),
            exchange=exchange,
            binding_key=binding_key,
            exclusive_work=exclusive_work,
            queue=queue or f"std-daq-{uuid.uuid4()}",
        )
        on_done = functools.partial(self._ack, consumer) if exclusive_work else None
        consumer.worker = ConsumerWorker(f"consumer-{exchange}-{binding_key}", callback, on_done)
        with self._lock:
            self._consumers[consumer.key] = consumer
        try:
            self._call(functools.partial(self._bind, consumer), f"binding to exchange {exchange!r}")
        except BaseException:
            self._cancel(consumer)
            raise
        return functools.partial(self._cancel, consumer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._thread.join(timeout=30.0)
        with self._lock:
            consumers = list(self._consumers.values())
            self._consumers.clear()
        for consumer in consumers:
            if consumer.worker is not None:
                consumer.worker.stop()

    # ------------------------------------------------------------------ caller side

    def _submit(
        self, operation: Callable[[concurrent.futures.Future[Any]], None]
    ) -> concurrent.futures.Future[Any] | None:
        """Queue ``operation(future)`` on the connection thread; None while disconnected."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("RabbitMQTransport operations must not run on its connection thread")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if not self._connected.is_set() or self._connection is None:
                return None
            self._pending.add(future)
            try:
                self._connection.add_callback_threadsafe(functools.partial(operation, future))
            except AMQPError:
                self._pending.discard(future)
                return None
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _call(
        self,
        operation: Callable[[concurrent.futures.Future[Any]], None],
        what: str,
        deadline: float | None = None,
    ) -> Any:
        """Run ``operation`` on the connection, retrying across reconnects until
        ``reconnect_timeout`` has passed without success (or the monotonic ``deadline``, if earlier).
        An operation given up on is cancelled: it does not run later."""
        started = time.monotonic()
        limit = started + self._reconnect_timeout
        deadline = limit if deadline is None else min(deadline, limit)
        while True:
            if self._closed:
                raise ConnectionError(f"RabbitMQ transport to {self.where} is closed; {what} was not sent")
            future = self._submit(operation)
            if future is not None:
                try:
                    return future.result(timeout=max(0.0, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    if not future.cancel() and future.done():  # it ran meanwhile: its outcome counts
                        return future.result()
                    self._last_error = "no answer from the connection thread"
                except (AMQPError, OSError) as exc:
                    self._last_error = _describe(exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionError(
                    f"RabbitMQ at {self.where} unreachable for {time.monotonic() - started:.1f} s "
                    f"({self._last_error}); {what} failed"
                )
            if self._connected.is_set():
                self._closing.wait(min(0.1, remaining))
            else:
                self._connected.wait(min(0.5, remaining))

    def _ack(self, consumer: _Consumer, token: tuple[int, BlockingChannel, int]) -> None:
        self._submit(functools.partial(self._ack_now, *token))

    def _cancel(self, consumer: _Consumer) -> None:
        with self._lock:
            registered = self._consumers.pop(consumer.key, None) is not None
        if registered:
            future = self._submit(functools.partial(self._unbind, consumer))
            if future is not None:
                try:
                    future.result(timeout=10.0)
                except (concurrent.futures.TimeoutError, AMQPError, OSError) as exc:
                    _logger.debug("Cancelling consumer on %s: %s", consumer.exchange, exc)
        if consumer.worker is not None:
            consumer.worker.stop()

    # ------------------------------------------------------------------ connection thread

    def _run(self) -> None:
        delay = self._retry_interval
        while not self._closing.is_set():
            connection: BlockingConnection | None = None
            try:
                connection = pika.BlockingConnection(self._params)
                self._setup(connection)
            except (AMQPError, OSError) as exc:
                self._close_quietly(connection)
                self._last_error = _describe(exc)
                if not self._started.is_set():
                    self._startup_error = exc
                    self._started.set()
                    return
                _logger.debug("RabbitMQ at %s still unreachable (%s)", self.where, self._last_error)
                self._closing.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._started.is_set():
                _logger.warning("Reconnected to RabbitMQ at %s", self.where)
            self._started.set()
            delay = self._retry_interval
            self._serve(connection)

    def _setup(self, connection: BlockingConnection) -> None:
        """Declare, then re-bind every consumer, before anyone may publish on this connection."""
        self._declared = set()
        for exchange in (REQUEST_EXCHANGE, KILL_EXCHANGE, STATUS_EXCHANGE):
            self._ensure_exchange(connection, exchange)
        channel = connection.channel()
        channel.confirm_delivery()
        with self._lock:
            self._connection = connection
            self._publish_channel = channel
            self._generation += 1
            consumers = list(self._consumers.values())
        for consumer in consumers:
            self._bind_now(consumer)
        self._connected.set()

    def _serve(self, connection: BlockingConnection) -> None:
        try:
            while not self._closing.is_set():
                connection.process_data_events(time_limit=_POLL_S)
                self._rebind_closed_consumers()
        except (AMQPError, OSError) as exc:
            self._last_error = _describe(exc)
            _logger.warning(
                "Lost connection to RabbitMQ at %s (%s); reconnecting", self.where, self._last_error
            )
        finally:
            with self._lock:
                self._connected.clear()
                self._connection = None
                self._publish_channel = None
                pending = list(self._pending)
                self._pending.clear()
            for future in pending:
                _fail(future, _ConnectionLost(f"connection to RabbitMQ at {self.where} lost"))
            self._close_quietly(connection)

    def _rebind_closed_consumers(self) -> None:
        """A channel the broker closed (for a work queue typically RabbitMQ's ``consumer_timeout``,
        30 min by default, hit by a long request) would silently end consuming: bind it again. The
        queue kept what arrived meanwhile; an unacknowledged request comes again and is recognised
        by its id (a service runs each request id once)."""
        for consumer in list(self._consumers.values()):
            channel = consumer.channel
            if channel is not None and channel.is_closed and consumer.generation == self._generation:
                _logger.error(
                    "RabbitMQ at %s closed the channel of the consumer of %r/%r; binding it again "
                    "(for long requests raise the broker's consumer_timeout)",
                    self.where,
                    consumer.exchange,
                    consumer.binding_key,
                )
                consumer.generation = 0
                self._bind_now(consumer)

    @staticmethod
    def _close_quietly(connection: BlockingConnection | None) -> None:
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (AMQPError, OSError) as exc:
                _logger.debug("Closing RabbitMQ connection: %s", exc)

    def _ensure_exchange(self, connection: BlockingConnection, exchange: str) -> None:
        """Declare a topic exchange; tolerate one that already exists with another type (the seed's
        later ``status`` exchange is fanout) so both seed eras interoperate."""
        if exchange in self._declared:
            return
        channel = connection.channel()
        try:
            channel.exchange_declare(exchange=exchange, exchange_type=EXCHANGE_TYPE)
        except ChannelClosedByBroker as exc:
            if exc.reply_code != _PRECONDITION_FAILED:
                raise
            channel = connection.channel()
            channel.exchange_declare(exchange=exchange, passive=True)
            _logger.warning(
                "Exchange %r exists on RabbitMQ at %s with a type other than %s (%s); using it as it is",
                exchange,
                self.where,
                EXCHANGE_TYPE,
                exc.reply_text,
            )
        if channel.is_open:
            channel.close()
        self._declared.add(exchange)

    def _publish_now(
        self,
        message: Message,
        properties: pika.BasicProperties,
        mandatory: bool,
        future: concurrent.futures.Future[Any],
    ) -> None:
        if future.done():
            return
        connection = self._connection
        try:
            if connection is None:
                raise _ConnectionLost("not connected")
            self._ensure_exchange(connection, message.exchange)
            channel = self._publish_channel
            if channel is None or channel.is_closed:
                channel = connection.channel()
                channel.confirm_delivery()
                self._publish_channel = channel
            channel.basic_publish(
                exchange=message.exchange,
                routing_key=message.routing_key,
                body=message.body,
                properties=properties,
                mandatory=mandatory,
            )
        except UnroutableError:
            _resolve(future, False)
        except NackError as exc:
            _fail(future, _ConnectionLost(f"broker refused the message: {exc}"))
        except (AMQPError, OSError) as exc:
            _fail(future, exc)
        else:
            _resolve(future, True)

    def _bind(self, consumer: _Consumer, future: concurrent.futures.Future[Any]) -> None:
        try:
            self._bind_now(consumer)
        except (AMQPError, OSError) as exc:
            _fail(future, exc)
        else:
            _resolve(future, True)

    def _bind_now(self, consumer: _Consumer) -> None:
        connection = self._connection
        if connection is None:
            raise _ConnectionLost("not connected")
        if consumer.key not in self._consumers or consumer.generation == self._generation:
            return  # cancelled meanwhile, or already bound by the reconnect
        generation = self._generation
        self._ensure_exchange(connection, consumer.exchange)
        channel = connection.channel()
        if consumer.exclusive_work:
            channel.basic_qos(prefetch_count=1)
        channel.queue_declare(
            queue=consumer.queue,
            arguments={"x-expires": QUEUE_EXPIRES_S * 1000, "x-max-length": QUEUE_MAX_LENGTH},
        )
        channel.queue_bind(queue=consumer.queue, exchange=consumer.exchange, routing_key=consumer.binding_key)
        channel.basic_consume(
            consumer.queue,
            functools.partial(self._on_delivery, consumer, generation),
            auto_ack=not consumer.exclusive_work,
        )
        consumer.channel = channel
        consumer.generation = generation

    def _unbind(self, consumer: _Consumer, future: concurrent.futures.Future[Any]) -> None:
        channel = consumer.channel
        try:
            if channel is not None and channel.is_open and consumer.generation == self._generation:
                channel.queue_delete(queue=consumer.queue)  # cancels the consumer with its queue
                channel.close()
        except (AMQPError, OSError) as exc:
            _logger.debug("Closing consumer channel: %s", exc)
        _resolve(future, True)

    def _on_delivery(
        self,
        consumer: _Consumer,
        generation: int,
        channel: BlockingChannel,
        method: Any,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        message = Message(
            exchange=method.exchange,
            routing_key=method.routing_key,
            body=bytes(body),
            correlation_id=properties.correlation_id or "",
            headers=decode_headers(properties.headers),
            redelivered=bool(getattr(method, "redelivered", False)),
        )
        if consumer.worker is not None:
            consumer.worker.put(message, (generation, channel, method.delivery_tag))

    def _ack_now(
        self,
        generation: int,
        channel: BlockingChannel,
        delivery_tag: int,
        future: concurrent.futures.Future[Any],
    ) -> None:
        # A delivery from before a reconnect cannot be acked (its queue died with the connection).
        if generation == self._generation and channel.is_open:
            try:
                channel.basic_ack(delivery_tag=delivery_tag)
            except (AMQPError, OSError) as exc:
                _logger.debug("Ack of delivery %d failed: %s", delivery_tag, exc)
        _resolve(future, True)
