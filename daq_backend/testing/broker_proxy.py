"""A TCP proxy in front of the machine's RabbitMQ that a test can cut and restore.

The processes under test connect to the proxy's port; the test itself (and every other test) keeps
talking to RabbitMQ directly. ``cut()`` closes every proxied connection and the listening socket (a
client sees its connection drop and new connections refused, as when the broker is stopped);
``freeze()`` keeps every connection open but lets nothing through either way, and new connections
hang (a network partition); ``restore()`` undoes either.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from daq_backend.testing import free_tcp_port

RABBITMQ = ("127.0.0.1", 5672)


class BrokerProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream`` (bytes both ways, one thread for everything)."""

    def __init__(self, upstream: tuple[str, int] = RABBITMQ, port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_tcp_port()
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._peers: dict[socket.socket, socket.socket] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._frozen = False
        self.connections = 0
        self._thread = threading.Thread(target=self._run, name=f"broker-proxy-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        """AMQP URL of RabbitMQ through this proxy."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def is_cut(self) -> bool:
        """Whether the proxy is cut (no listening socket)."""
        return self._listener is None

    def start(self) -> BrokerProxy:
        """Listen and start forwarding in a thread; returns the proxy."""
        self._listen()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop forwarding and close every connection and socket."""
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(10)
        self.cut()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def cut(self) -> None:
        """Drop every connection and stop listening (the broker is gone)."""
        with self._lock:
            listener, self._listener = self._listener, None
            peers = list(self._peers)
            self._peers.clear()
        for sock in [*([listener] if listener else []), *peers]:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def freeze(self) -> None:
        """Let nothing through, keeping the connections open (the network to the broker is gone)."""
        self._frozen = True

    def restore(self) -> None:
        """The broker is back: after a freeze the stalled connections are dropped (their clients gave
        up on them, or will); after a cut the proxy listens again on the same port."""
        if self._frozen:
            self.cut()
            self._frozen = False
        if self._listener is None:
            self._listen()
            self._wake_w.send(b"x")

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        with self._lock:
            self._listener = listener
            self._selector.register(listener, selectors.EVENT_READ)

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        if self._frozen:  # held open, never answered
            client.setblocking(False)
            with self._lock:
                self._peers[client] = client
                self._selector.register(client, selectors.EVENT_READ)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._peers[client] = upstream
            self._peers[upstream] = client
            self._selector.register(client, selectors.EVENT_READ)
            self._selector.register(upstream, selectors.EVENT_READ)
        self.connections += 1

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            other = self._peers.pop(sock, None)
            if other is not None:
                self._peers.pop(other, None)
        for s in (sock, other):
            if s is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            s.close()

    def _forward(self, sock: socket.socket) -> None:
        other = self._peers.get(sock)
        if other is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        if self._frozen or other is sock:
            return  # swallowed
        try:
            other.setblocking(True)
            other.sendall(data)
            other.setblocking(False)
        except OSError:
            self._drop(sock)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._selector.select(timeout=0.5)
            except (OSError, ValueError):
                continue
            for key, _ in events:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        sock.recv(64)
                elif sock is self._listener:
                    self._accept(sock)
                elif sock in self._peers:
                    self._forward(sock)
