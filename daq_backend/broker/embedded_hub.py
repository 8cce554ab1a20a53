"""The embedded broker: a small ZMQ hub that gives processes on one host the AMQP semantics the
protocol needs (topic exchanges, one queue per consumer, prefetch-1 work queues), with no server.

The hub binds a ROUTER on ``ipc://<ipc_dir>/std-daq-broker-<name>/hub.sock`` and holds an
exclusive ``flock`` on ``hub.lock`` next to it for its lifetime, so a client can tell at once
whether a hub is running (the lock dies with the process, no stale pid files).

Wire format (multipart frames; the ROUTER adds the client identity in front):

* client -> hub: ``[command, seq, *args]`` with commands ``HELLO``, ``PING``,
  ``PUB mandatory exchange routing_key correlation_id headers_json body``,
  ``SUB consumer_id exchange binding_key exclusive``, ``UNSUB consumer_id``, ``DONE consumer_id``,
  ``BYE`` (the client closes; its consumers go at once);
  every command is answered ``[OK|NOROUTE|UNKNOWN|ERROR, seq]``. ``UNKNOWN``: the hub does not know
  this client (it restarted, or timed the client out) and did nothing; the client sends ``HELLO``
  and all its ``SUB``s again, then repeats the command.
* hub -> client: ``[MSG, consumer_id, exchange, routing_key, correlation_id, headers_json, body]``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

import zmq

from daq_backend.broker.protocol import topic_matches
from daq_backend.ipc import ipc_dir

_logger = logging.getLogger(__name__)

HELLO, PING, PUB, SUB, UNSUB, DONE, BYE = b"HELLO", b"PING", b"PUB", b"SUB", b"UNSUB", b"DONE", b"BYE"
OK, NOROUTE, UNKNOWN, ERROR, MSG = b"OK", b"NOROUTE", b"UNKNOWN", b"ERROR", b"MSG"
PING_INTERVAL_S = 1.0
CLIENT_TIMEOUT_S = 15.0
_HWM = 100_000

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


_HELD_LOCKS: set[int] = set()


def _release_inherited_locks() -> None:
    """A forked child must not keep a hub's lock alive after the hub's process is gone."""
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):  # already closed by the child
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_release_inherited_locks)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"Invalid embedded broker name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def hub_directory(name: str) -> str:
    return os.path.join(ipc_dir(), f"std-daq-broker-{check_name(name)}")


def hub_address(name: str) -> str:
    return f"ipc://{hub_directory(name)}/hub.sock"


def hub_lock_path(name: str) -> str:
    return os.path.join(hub_directory(name), "hub.lock")


def hub_is_running(name: str) -> bool:
    """True while some process holds the hub lock of ``name``."""
    try:
        fd = os.open(hub_lock_path(name), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also releases a lock we may have taken
    return False


@dataclass(eq=False)
class _Subscription:
    client: bytes
    consumer_id: bytes
    exchange: str
    binding_key: str
    exclusive: bool
    backlog: collections.deque[list[bytes]] = field(default_factory=collections.deque)
    in_flight: bool = False


@dataclass(eq=False)
class _Client:
    last_seen: float
    subscriptions: dict[bytes, _Subscription] = field(default_factory=dict)


class EmbeddedBrokerHub:
    """Routes messages between the ``EmbeddedTransport`` clients of one host.

    Run it in a thread of the supervisor (``start()``/``stop()``) or in a process of its own; only
    one hub per name can run on a host.
    """

    def __init__(self, name: str = "default", *, client_timeout: float = CLIENT_TIMEOUT_S) -> None:
        self.name = check_name(name)
        self.directory = hub_directory(name)
        self.address = hub_address(name)
        self.broker_url = f"embedded://{name}"
        self._client_timeout = client_timeout
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: dict[bytes, _Client] = {}
        self._router: zmq.Socket[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"Embedded broker hub {self.name!r} already started")
        os.makedirs(self.directory, exist_ok=True)
        lock_fd = os.open(hub_lock_path(self.name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise RuntimeError(
                f"An embedded broker hub {self.name!r} is already running on this host "
                f"({self.address}); stop it or choose another name"
            ) from None
        self._lock_fd = lock_fd
        _HELD_LOCKS.add(lock_fd)
        socket_path = self.address.removeprefix("ipc://")
        if os.path.exists(socket_path):
            os.unlink(socket_path)  # left by a hub that died; we hold the lock, so it is stale
        self._context = zmq.Context()
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, _HWM)
        router.setsockopt(zmq.RCVHWM, _HWM)
        router.bind(self.address)
        self._router = router
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"broker-hub-{self.name}", daemon=True)
        self._thread.start()
        _logger.info("Embedded broker hub %r listening on %s", self.name, self.address)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join()
        self._thread = None
        self._clients.clear()
        socket_path = self.address.removeprefix("ipc://")
        for path in (socket_path, hub_lock_path(self.name)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self._lock_fd is not None:
            _HELD_LOCKS.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None
        with contextlib.suppress(OSError):  # not empty (someone else's files) or already gone
            os.rmdir(self.directory)
        if self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> EmbeddedBrokerHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ hub thread

    def _run(self) -> None:
        router = self._router
        assert router is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        next_expiry = time.monotonic() + PING_INTERVAL_S
        try:
            while not self._stopping.is_set():
                if poller.poll(200):
                    while True:
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                if time.monotonic() >= next_expiry:
                    self._expire_clients()
                    next_expiry = time.monotonic() + PING_INTERVAL_S
        finally:
            router.close(linger=0)
            self._router = None

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            _logger.warning("Embedded hub: ignoring a message of %d frames", len(frames))
            return
        identity, command, seq, args = frames[0], frames[1], frames[2], frames[3:]
        if command == BYE:
            self._drop(identity, "closed")
            return
        client = self._clients.get(identity)
        if command == HELLO:
            if client is None:
                client = self._clients[identity] = _Client(last_seen=time.monotonic())
        elif client is None:
            # Only a HELLO registers a client: anyone else (we restarted, or timed it out) must
            # first re-subscribe everything, then repeat the command, so that e.g. a request is
            # never routed before the sender's own status consumer is bound again.
            self._send(identity, [UNKNOWN, seq])
            return
        client.last_seen = time.monotonic()
        reply = OK
        if command == PUB and len(args) == 6:
            reply = self._publish(args)
        elif command == SUB and len(args) == 4:
            self._subscribe(identity, client, args)
        elif command == UNSUB and len(args) == 1:
            client.subscriptions.pop(args[0], None)
        elif command == DONE and len(args) == 1:
            subscription = client.subscriptions.get(args[0])
            if subscription is not None:
                subscription.in_flight = False
                self._pump(subscription)
        elif command not in (HELLO, PING):
            _logger.warning("Embedded hub: ignoring malformed command %r (%d args)", command, len(args))
            reply = ERROR
        self._send(identity, [reply, seq])

    def _subscribe(self, identity: bytes, client: _Client, args: list[bytes]) -> None:
        consumer_id, exchange, binding_key, exclusive = args
        if consumer_id in client.subscriptions:
            return  # a repeated SUB (the client re-subscribes when unsure): keep queue and in-flight state
        client.subscriptions[consumer_id] = _Subscription(
            client=identity,
            consumer_id=consumer_id,
            exchange=exchange.decode(),
            binding_key=binding_key.decode(),
            exclusive=exclusive == b"1",
        )

    def _publish(self, args: list[bytes]) -> bytes:
        mandatory, exchange_b, routing_key_b = args[0], args[1], args[2]
        exchange, routing_key = exchange_b.decode(), routing_key_b.decode()
        matches = [
            subscription
            for client in self._clients.values()
            for subscription in client.subscriptions.values()
            if subscription.exchange == exchange and topic_matches(subscription.binding_key, routing_key)
        ]
        if not matches:
            return NOROUTE if mandatory == b"1" else OK
        for subscription in matches:
            frames = [MSG, subscription.consumer_id, *args[1:]]
            if subscription.exclusive:
                subscription.backlog.append(frames)
                self._pump(subscription)
            else:
                self._send(subscription.client, frames)
        return OK

    def _pump(self, subscription: _Subscription) -> None:
        """Prefetch 1: hand out the next queued message once the previous one is DONE."""
        if subscription.in_flight or not subscription.backlog:
            return
        subscription.in_flight = True
        self._send(subscription.client, subscription.backlog.popleft())

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        router = self._router
        assert router is not None
        try:
            router.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.error.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._drop(identity, "disconnected")
            else:
                _logger.warning("Embedded hub: message to a client dropped (%s)", exc)

    def _drop(self, identity: bytes, why: str) -> None:
        client = self._clients.pop(identity, None)
        if client is not None:
            _logger.info(
                "Embedded hub: client %s %s; dropping %d consumer(s)",
                identity.hex(),
                why,
                len(client.subscriptions),
            )

    def _expire_clients(self) -> None:
        limit = time.monotonic() - self._client_timeout
        for identity in [key for key, client in self._clients.items() if client.last_seen < limit]:
            self._drop(identity, f"silent for {self._client_timeout:g} s")
