"""The seed's service-container conventions (reference §1.1), usable by every entry point.

* ``SERVICE_NAME`` names the service (default: a random uuid, as the seed's ``start_utils``),
  ``REDIS_HOST`` points at Redis (``host``, ``host:port`` or a ``redis://`` URL; unset or ``embedded``
  means an in-process fakeredis, so one host needs no server), ``REDIS_SKIP`` disables Redis,
  ``BROKER_HOST`` is the broker (a host name or a full ``amqp://`` URL).
* The configuration comes from a JSON file, else from the Redis string key ``config.<SERVICE_NAME>``
  (missing key: ``{}``). A file of one byte or less aborts: the seed treated that as a broken mount.
* A heartbeat keeps ``HSET status.<SERVICE_NAME> config <json>`` alive with ``EXPIRE 15`` refreshed
  every 10 s, so a monitor sees a dead service disappear within 15 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import redis

from daq_backend.broker.transport import host_to_url

_logger = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = "config.json"
DEFAULT_LOG_LEVEL = "INFO"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
HEARTBEAT_INTERVAL = 10.0
HEARTBEAT_EXPIRY = 15
EMBEDDED = "embedded"
DEFAULT_REDIS_PORT = 6379

_embedded_server: fakeredis.FakeServer | None = None
_embedded_lock = threading.Lock()


class ServiceConfigError(RuntimeError):
    """The service cannot get a usable configuration; the message says where it looked and why."""


def config_key(service_name: str) -> str:
    return f"config.{service_name}"


def status_key(service_name: str) -> str:
    return f"status.{service_name}"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ServiceEnv:
    """The container's environment variables, read once."""

    service_name: str | None = None
    redis_host: str | None = None
    redis_skip: bool = False
    broker_host: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ServiceEnv:
        env = os.environ if environ is None else environ
        return cls(
            service_name=env.get("SERVICE_NAME") or None,
            redis_host=env.get("REDIS_HOST") or None,
            redis_skip=_truthy(env.get("REDIS_SKIP")),
            broker_host=env.get("BROKER_HOST") or None,
        )

    @property
    def broker_url(self) -> str | None:
        """``BROKER_HOST`` as a URL the broker transports accept (None: embedded broker)."""
        return broker_url_from_host(self.broker_host)


def broker_url_from_host(host: str | None) -> str | None:
    """``BROKER_HOST`` (a host, ``host:port`` or a full URL) as a broker URL; None: the embedded broker."""
    if not host or host == EMBEDDED:
        return None
    return host if "://" in host else host_to_url(host)


def embedded_redis_server() -> fakeredis.FakeServer:
    """One in-process Redis data set shared by every embedded client of this process."""
    global _embedded_server
    with _embedded_lock:
        if _embedded_server is None:
            _embedded_server = fakeredis.FakeServer()
        return _embedded_server


def connect_redis(host: str | None) -> redis.Redis:
    """A client for ``REDIS_HOST``; ``None``/``"embedded"`` gives the in-process fakeredis."""
    if host is None or host == EMBEDDED:
        return fakeredis.FakeRedis(server=embedded_redis_server(), decode_responses=True)
    if "://" in host:
        return redis.Redis.from_url(host, decode_responses=True)
    name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
    try:
        port_number = int(port) if port else DEFAULT_REDIS_PORT
    except ValueError:
        raise ServiceConfigError(f"REDIS_HOST={host!r}: port {port!r} is not a number") from None
    return redis.Redis(host=name or host, port=port_number, decode_responses=True)


def _parse_config_text(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServiceConfigError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ServiceConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def load_service_config(
    service_name: str, config_file: str | os.PathLike[str] | None, redis_client: redis.Redis | None
) -> dict[str, Any]:
    """The seed's entrypoint rule: a present file wins, else the Redis key, else ``{}``."""
    if config_file is not None:
        path = Path(config_file)
        if path.exists():
            size = path.stat().st_size
            if size <= 1:
                raise ServiceConfigError(
                    f"config file {path} holds {size} byte(s): an empty file is refused "
                    "(remove it to read the config from Redis instead)"
                )
            return _parse_config_text(path.read_text(), str(path))
    if redis_client is None:
        raise ServiceConfigError(
            f"config file {config_file} does not exist and Redis is skipped (REDIS_SKIP): no configuration"
        )
    key = config_key(service_name)
    try:
        raw = redis_client.get(key)
    except redis.RedisError as exc:
        raise ServiceConfigError(f"cannot read Redis key {key}: {exc}") from None
    if raw is None:
        _logger.info("Redis key %s missing, using an empty config.", key)
        return {}
    return _parse_config_text(raw if isinstance(raw, str) else raw.decode(), f"Redis key {key}")


class Heartbeat:
    """Keeps ``status.<name>`` alive: ``HSET … config <json>`` + ``EXPIRE`` every ``interval`` s.

    The first beat happens in :meth:`start` so the service is visible (or fails loudly) at once;
    later Redis errors are logged and retried, since a restarting Redis must not kill the service.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        service_name: str,
        config_json: str,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        expiry: int = HEARTBEAT_EXPIRY,
    ) -> None:
        if not 0 < interval < expiry:
            raise ValueError(f"heartbeat interval {interval} s must be > 0 and below the expiry {expiry} s")
        self.redis = redis_client
        self.service_name = service_name
        self.config_json = config_json
        self.interval = interval
        self.expiry = expiry
        self.n_beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return status_key(self.service_name)

    def beat(self) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.key, "config", self.config_json)
        pipe.expire(self.key, self.expiry)
        pipe.execute()
        self.n_beats += 1

    def start(self) -> Heartbeat:
        self.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.service_name}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except redis.RedisError as exc:
                _logger.warning("heartbeat %s failed: %s", self.key, exc)

    def stop(self, *, clear: bool = False) -> None:
        """Stop refreshing; ``clear=True`` also deletes the hash so monitors see the stop at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None
        if clear:
            self.redis.delete(self.key)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_service_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """The seed's common options, plus ``--broker_url`` (also spelled ``--broker-url``)."""
    env = ServiceEnv.from_environ(environ)
    parser.add_argument(
        "--service_name",
        "--service-name",
        dest="service_name",
        default=env.service_name or str(uuid.uuid4()),
        help="Name of the service (default: env SERVICE_NAME, else a random uuid).",
    )
    parser.add_argument(
        "--json_config_file",
        "--json-config-file",
        dest="json_config_file",
        default=DEFAULT_CONFIG_FILE,
        help="JSON config file; when absent the config comes from Redis key config.<service_name>.",
    )
    parser.add_argument(
        "--log_level", "--log-level", dest="log_level", default=DEFAULT_LOG_LEVEL, choices=LOG_LEVELS
    )
    parser.add_argument(
        "--broker_url",
        "--broker-url",
        dest="broker_url",
        default=env.broker_url,
        help="Broker URL (amqp://...); default: env BROKER_HOST, else the embedded broker.",
    )


@dataclass
class Service:
    """A started service: its name, configuration, parsed arguments, Redis client and heartbeat."""

    name: str
    config: dict[str, Any]
    args: argparse.Namespace
    redis: redis.Redis | None = None
    heartbeat: Heartbeat | None = field(default=None, repr=False)

    def close(self, *, clear_status: bool = False) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop(clear=clear_status)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def setup_service(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    redis_client: redis.Redis | None = None,
    heartbeat: bool = True,
    heartbeat_interval: float = HEARTBEAT_INTERVAL,
    heartbeat_expiry: int = HEARTBEAT_EXPIRY,
) -> Service:
    """Parse the seed's options, load the config (file, else Redis) and start the heartbeat."""
    add_service_arguments(parser, environ)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(asctime)s %(name)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    env = ServiceEnv.from_environ(environ)
    client = None if env.redis_skip else (redis_client or connect_redis(env.redis_host))
    config = load_service_config(args.service_name, args.json_config_file, client)
    service = Service(name=args.service_name, config=config, args=args, redis=client)
    if heartbeat and client is not None:
        service.heartbeat = Heartbeat(
            client,
            args.service_name,
            json.dumps(config),
            interval=heartbeat_interval,
            expiry=heartbeat_expiry,
        ).start()
    return service


def default_service_setup(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, **kwargs: Any
) -> tuple[str, dict[str, Any], argparse.Namespace]:
    """The seed's signature: ``service_name, config, args`` (the heartbeat runs for the process's life)."""
    service = setup_service(parser, argv, **kwargs)
    return service.name, service.config, service.args
