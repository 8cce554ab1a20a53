"""Where the EPICS buffer keeps its streams: a real Redis server, or an embedded one.

Both go through the same ``redis.Redis`` client code: the embedded default is fakeredis' TCP
server running in this process (no installation, no set-up), so the buffer, the writer and a
debugging ``redis-cli`` all talk RESP to a socket either way. Other processes reach an embedded
store through its ``url`` (``redis://127.0.0.1:<port>``).

``make_store(url)`` picks:

* ``redis://host:port[/db]`` (or ``rediss://``, ``unix://``): that server;
* ``embedded`` or ``embedded://host:port``: start an in-process server (port 0 / omitted = free port);
* ``None``: env ``REDIS_HOST`` (the seed's container convention: ``host``, ``host:port``, a URL or
  ``embedded``, as in ``daq_backend.service``) if set, else ``embedded``.
"""

from __future__ import annotations

import logging
import os
import threading
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import redis
from fakeredis import FakeServer, TcpFakeServer
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

DEFAULT_REDIS_PORT = 6379
EMBEDDED = "embedded"
# Short timeouts: a Redis outage must surface as an error within seconds, not hang the buffer.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


class EmbeddedRedisServer:
    """fakeredis' RESP server on a 127.0.0.1 TCP port, served by a thread of this process.

    ``backend`` lets a restarted server keep the data of a previous one (used to simulate a
    Redis outage and recovery).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, backend: FakeServer | None = None) -> None:
        self._server = TcpFakeServer((host, port))
        if backend is not None:
            self._server.fake_server = backend
        address, self.port = self._server.server_address[:2]
        self.host = address.decode() if isinstance(address, bytes | bytearray) else str(address)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="embedded-redis",
            daemon=True,
        )
        self._thread.start()
        log.info("Embedded Redis (fakeredis) serving on %s", self.url)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def backend(self) -> FakeServer:
        return self._server.fake_server

    def stop(self) -> None:
        """Stop serving and close the port; connected clients see their connection drop."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()


class Store:
    """A Redis client bound to one server, owning that server when it is embedded."""

    def __init__(self, url: str, embedded: EmbeddedRedisServer | None = None) -> None:
        self.url = url
        self.embedded = embedded
        # One immediate retry replaces a pooled connection that died with a restarted server;
        # longer outages are the caller's business (the buffer keeps a backlog and retries).
        self.redis = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
        )

    def ping(self) -> bool:
        """True when the server answers now."""
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.redis.close()
        if self.embedded is not None:
            self.embedded.stop()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "embedded" if self.embedded is not None else "redis"
        return f"Store({kind} {self.url})"


def _url_from_env() -> str:
    host = os.environ.get("REDIS_HOST", "").strip()
    if not host or host == EMBEDDED or "://" in host:
        return host or EMBEDDED
    if ":" in host:
        return f"redis://{host}"
    return f"redis://{host}:{DEFAULT_REDIS_PORT}"


def make_store(redis_url: str | None = None) -> Store:
    """The store for ``redis_url`` (see the module docstring for the accepted forms)."""
    url = _url_from_env() if redis_url is None else redis_url.strip()
    parts = urlsplit(url)
    if url == EMBEDDED or parts.scheme == EMBEDDED:
        server = EmbeddedRedisServer(parts.hostname or "127.0.0.1", parts.port or 0)
        return Store(server.url, embedded=server)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"redis_url: unsupported {url!r}; use redis://host:port, unix://path, 'embedded' or embedded://host:port"
        )
    return Store(url)


#: one entry of a Redis stream as the client returns it without ``decode_responses``: (id, fields)
StreamEntry = tuple[bytes, dict[bytes, bytes]]


def xrange(r: redis.Redis, key: str, min: str = "-", max: str = "+",
           count: int | None = None) -> list[StreamEntry]:
    """``XRANGE key min max [COUNT count]``, typed (the client's own signature says "anything")."""
    return cast(list[StreamEntry], r.xrange(key, min=min, max=max, count=count))


def xrevrange(r: redis.Redis, key: str, max: str = "+", min: str = "-",
              count: int | None = None) -> list[StreamEntry]:
    """``XREVRANGE key max min [COUNT count]``, typed."""
    return cast(list[StreamEntry], r.xrevrange(key, max=max, min=min, count=count))
