"""Embedded transport: the broker protocol between processes of one host with no server to run.

A client of the ``EmbeddedBrokerHub`` of the same name (see ``embedded_hub`` for the wire format).
Like the RabbitMQ transport, one I/O thread owns the ZMQ sockets (they are not thread-safe);
other threads send it commands over an inproc socket and wait for the hub's answer, so
``publish`` returning means the hub has routed the message, exactly as with publisher confirms.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from daq_backend.broker.dispatch import ConsumerWorker
from daq_backend.broker.embedded_hub import (
    BYE,
    DONE,
    HELLO,
    MSG,
    NOROUTE,
    OK,
    PING,
    PING_INTERVAL_S,
    PUB,
    SUB,
    UNKNOWN,
    UNSUB,
    check_name,
    hub_address,
    hub_is_running,
)
from daq_backend.broker.protocol import Callback, Message, NoRouteError, Transport

_logger = logging.getLogger(__name__)

_HWM = 100_000
_UNAWAITED = b"0"


class _HubLost(ConnectionError):
    """The hub connection dropped while a command waited for its answer (internal, retried)."""


@dataclass(eq=False)
class _EmbeddedConsumer:
    consumer_id: bytes
    exchange: str
    binding_key: str
    exclusive_work: bool
    worker: ConsumerWorker

    def sub_frames(self) -> list[bytes]:
        flag = b"1" if self.exclusive_work else b"0"
        return [self.consumer_id, self.exchange.encode(), self.binding_key.encode(), flag]


def no_hub_message(name: str) -> str:
    return (
        f"No embedded broker hub {name!r} is running on this host (expected at {hub_address(name)}). "
        "Start the DAQ with `std-daq up CONFIG` (it runs the hub), "
        "or pass --broker_url amqp://HOST to use RabbitMQ."
    )


class EmbeddedTransport(Transport):
    """The broker protocol through the embedded hub ``name`` on this host.

    Raises ``ConnectionError`` at construction when no such hub runs. ``reconnect_timeout`` bounds
    how long an operation waits for a restarted hub; ``route_timeout`` how long a mandatory publish
    retries while no consumer is bound.
    """

    def __init__(
        self,
        name: str = "default",
        *,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 30.0,
        route_timeout: float = 5.0,
    ) -> None:
        self.name = check_name(name)
        self.address = hub_address(name)
        self.broker_url = f"embedded://{name}"
        self.where = f"embedded hub {name!r} ({self.address})"
        self._last_error = "no error"
        if not hub_is_running(name):
            raise ConnectionError(no_hub_message(name))
        self._reconnect_timeout = reconnect_timeout
        self._route_timeout = route_timeout

        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        command_address = f"inproc://embedded-commands-{uuid.uuid4().hex}"
        self._commands_in = self._context.socket(zmq.PULL)
        self._commands_in.bind(command_address)
        self._commands_out: zmq.Socket[bytes] | None = self._context.socket(zmq.PUSH)
        self._commands_out.setsockopt(zmq.SNDHWM, 0)
        self._commands_out.connect(command_address)
        self._dealer = self._context.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a hub we are not connected to
        self._dealer.setsockopt(zmq.LINGER, 1000)  # but let a final BYE out
        self._dealer.setsockopt(zmq.SNDHWM, _HWM)
        self._dealer.setsockopt(zmq.RCVHWM, _HWM)
        self._dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        self._monitor = self._dealer.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self._dealer.connect(self.address)

        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._futures: dict[int, concurrent.futures.Future[bytes]] = {}
        self._consumers: dict[bytes, _EmbeddedConsumer] = {}
        self._seq = itertools.count(1)
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"embedded-broker-{name}", daemon=True)
        self._thread.start()
        try:
            self._call(HELLO, [], "the hello handshake", timeout=connect_timeout)
        except ConnectionError as exc:
            self.close()
            raise ConnectionError(
                f"Embedded broker hub {name!r} at {self.address} did not answer within "
                f"{connect_timeout:g} s ({exc})"
            ) from exc

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str:
        return self._last_error

    def publish(self, message: Message, *, mandatory: bool = False, timeout: float | None = None) -> None:
        try:
            headers = json.dumps(message.headers).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Message headers must be JSON-serialisable: {exc}") from exc
        args = [
            b"1" if mandatory else b"0",
            message.exchange.encode(),
            message.routing_key.encode(),
            message.correlation_id.encode(),
            headers,
            bytes(message.body),
        ]
        what = f"message to exchange {message.exchange!r} with routing key {message.routing_key!r}"
        deadline = None if timeout is None else time.monotonic() + timeout
        route_deadline: float | None = None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._call(PUB, args, what, timeout=remaining) != NOROUTE:
                return
            now = time.monotonic()
            route_deadline = route_deadline if route_deadline is not None else now + self._route_timeout
            if deadline is not None:
                route_deadline = min(route_deadline, deadline)
            if now + 0.1 >= route_deadline:  # no time left for another attempt
                raise NoRouteError(
                    f"No consumer is bound to exchange {message.exchange!r} for routing key "
                    f"{message.routing_key!r} on embedded broker {self.name!r} (retried for "
                    f"{self._route_timeout:g} s): is a service listening on that tag?"
                )
            self._closing.wait(0.1)

    def consume(
        self, exchange: str, binding_key: str, callback: Callback, *, exclusive_work: bool = False,
        queue: str | None = None,
    ) -> Callable[[], None]:
        consumer_id = uuid.uuid4().hex.encode()
        on_done = functools.partial(self._done, consumer_id) if exclusive_work else None
        consumer = _EmbeddedConsumer(
            consumer_id=consumer_id,
            exchange=exchange,
            binding_key=binding_key,
            exclusive_work=exclusive_work,
            worker=ConsumerWorker(f"consumer-{exchange}-{binding_key}", callback, on_done),
        )
        with self._lock:
            self._consumers[consumer_id] = consumer
        try:
            self._call(SUB, consumer.sub_frames(), f"binding to exchange {exchange!r}")
        except BaseException:
            self._cancel(consumer)
            raise
        return functools.partial(self._cancel, consumer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._send([BYE, _UNAWAITED])
        self._closing.set()
        self._thread.join(timeout=30.0)
        with self._send_lock:
            if self._commands_out is not None:
                self._commands_out.close(linger=0)
                self._commands_out = None
        with self._lock:
            consumers = list(self._consumers.values())
            self._consumers.clear()
        for consumer in consumers:
            consumer.worker.stop()
        self._context.term()

    # ------------------------------------------------------------------ caller side

    def _send(self, frames: list[bytes]) -> None:
        with self._send_lock:
            if self._commands_out is not None:
                self._commands_out.send_multipart(frames)

    def _call(self, command: bytes, args: list[bytes], what: str, timeout: float | None = None) -> bytes:
        """Send a command and return the hub's answer, retrying while the hub is unreachable."""
        limit = self._reconnect_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            if self._closed and command != HELLO:
                raise ConnectionError(f"Embedded transport {self.name!r} is closed; {what} failed")
            reply = b""
            try:
                reply = self._attempt(command, args, deadline)
            except concurrent.futures.TimeoutError:
                last_error = "no answer"
            except _HubLost as exc:
                last_error = str(exc)
            else:
                if reply in (OK, NOROUTE):
                    return reply
                if reply != UNKNOWN:
                    raise RuntimeError(f"Embedded broker hub {self.name!r} rejected {what}: {reply!r}")
                last_error = "the hub restarted"
            self._last_error = last_error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionError(
                    f"Embedded broker hub {self.name!r} at {self.address} unreachable for {limit:g} s "
                    f"({last_error}); {what} failed. Is `std-daq up` still running?"
                )
            if reply != UNKNOWN:  # after UNKNOWN the I/O thread has re-subscribed us: repeat at once
                self._connected.wait(min(0.5, remaining))
                self._closing.wait(min(0.05, remaining))

    def _attempt(self, command: bytes, args: list[bytes], deadline: float) -> bytes:
        seq = next(self._seq)
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        with self._lock:
            self._futures[seq] = future
        try:
            self._send([command, str(seq).encode(), *args])
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:
                self._futures.pop(seq, None)

    def _done(self, consumer_id: bytes, token: Any) -> None:
        self._send([DONE, _UNAWAITED, consumer_id])

    def _cancel(self, consumer: _EmbeddedConsumer) -> None:
        with self._lock:
            registered = self._consumers.pop(consumer.consumer_id, None) is not None
        if registered and not self._closed:
            try:
                self._call(UNSUB, [consumer.consumer_id], "unbinding a consumer", timeout=5.0)
            except ConnectionError as exc:
                _logger.debug("Unbinding consumer on %s: %s", consumer.exchange, exc)
        consumer.worker.stop()

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        poller = zmq.Poller()
        for socket in (self._dealer, self._commands_in, self._monitor):
            poller.register(socket, zmq.POLLIN)
        next_ping = time.monotonic() + PING_INTERVAL_S
        try:
            while True:
                events = dict(poller.poll(100))
                if self._monitor in events:
                    self._on_monitor()
                if self._commands_in in events or self._closing.is_set():
                    self._forward_commands()
                if self._dealer in events:
                    self._on_replies()
                if self._closing.is_set():
                    return
                if time.monotonic() >= next_ping:
                    self._send_to_hub([PING, _UNAWAITED])
                    next_ping = time.monotonic() + PING_INTERVAL_S
        finally:
            self._fail_pending("transport closed")
            self._dealer.disable_monitor()
            self._monitor.close(linger=0)
            self._commands_in.close(linger=0)
            self._dealer.close()

    def _on_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected.set()
                self._resubscribe()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._connected.clear()
                self._fail_pending(f"connection to hub {self.name!r} lost")

    def _forward_commands(self) -> None:
        while True:
            try:
                frames = self._commands_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not self._send_to_hub(frames) and frames[1] != _UNAWAITED:
                with self._lock:
                    future = self._futures.get(int(frames[1]))
                if future is not None and not future.done():
                    future.set_exception(_HubLost(f"not connected to hub {self.name!r}"))

    def _send_to_hub(self, frames: list[bytes]) -> bool:
        try:
            self._dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _on_replies(self) -> None:
        while True:
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames[0] == MSG and len(frames) == 7:
                self._deliver(frames[1:])
                continue
            if len(frames) != 2:
                _logger.warning("Embedded transport: ignoring a %d-frame message from the hub", len(frames))
                continue
            reply, seq = frames
            if reply == UNKNOWN:
                self._resubscribe()  # the hub forgot us (restarted or timed us out)
            with self._lock:
                future = self._futures.get(int(seq))
            if future is not None and not future.done():
                future.set_result(reply)

    def _deliver(self, frames: list[bytes]) -> None:
        consumer_id, exchange, routing_key, correlation_id, headers, body = frames
        with self._lock:
            consumer = self._consumers.get(consumer_id)
        if consumer is None:
            return  # cancelled meanwhile
        try:
            decoded_headers = json.loads(headers)
        except ValueError:
            _logger.warning("Embedded transport: undecodable headers on %s", exchange)
            decoded_headers = {}
        message = Message(
            exchange=exchange.decode(),
            routing_key=routing_key.decode(),
            body=body,
            correlation_id=correlation_id.decode(),
            headers=decoded_headers,
        )
        consumer.worker.put(message)

    def _resubscribe(self) -> None:
        with self._lock:
            consumers = list(self._consumers.values())
        self._send_to_hub([HELLO, _UNAWAITED])
        for consumer in consumers:
            self._send_to_hub([SUB, _UNAWAITED, *consumer.sub_frames()])

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            futures = list(self._futures.values())
        for future in futures:
            if not future.done():
                future.set_exception(_HubLost(why))
