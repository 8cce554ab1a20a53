"""Pick a transport from a broker URL, with the seed's environment conventions."""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from daq_backend.broker.embedded import EmbeddedTransport
from daq_backend.broker.protocol import Transport
from daq_backend.broker.rabbitmq import RabbitMQTransport

EMBEDDED = "embedded"
DEFAULT_EMBEDDED_NAME = "default"


def host_to_url(host: str) -> str:
    """``BROKER_HOST`` / a seed-style bare ``--broker_url HOST[:PORT]`` as an AMQP URL."""
    host, _, port = host.partition(":")
    return f"amqp://guest:guest@{host}:{port or 5672}/%2F"


def redact_url(url: str) -> str:
    """``url`` without its password (for status files and messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def resolve_broker_url(broker_url: str | None = None) -> str:
    """Explicit URL, else ``BROKER_URL``, else ``BROKER_HOST``, else the embedded broker."""
    if broker_url:
        return broker_url
    if os.environ.get("BROKER_URL"):
        return os.environ["BROKER_URL"]
    if os.environ.get("BROKER_HOST"):
        return host_to_url(os.environ["BROKER_HOST"])
    return EMBEDDED


def make_transport(broker_url: str | None = None, **options: Any) -> Transport:
    """``embedded`` / ``embedded://NAME`` -> EmbeddedTransport; ``amqp(s)://...`` or a bare host ->
    RabbitMQTransport. ``options`` go to the transport (timeouts)."""
    url = resolve_broker_url(broker_url)
    if url == EMBEDDED:
        return EmbeddedTransport(DEFAULT_EMBEDDED_NAME, **options)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return RabbitMQTransport(host_to_url(url), **options)
    if scheme == EMBEDDED:
        return EmbeddedTransport(urllib.parse.unquote(rest.strip("/")) or DEFAULT_EMBEDDED_NAME, **options)
    if scheme in ("amqp", "amqps"):
        return RabbitMQTransport(url, **options)
    raise ValueError(
        f"Unsupported broker URL {url!r}: use amqp://..., amqps://..., embedded or embedded://NAME"
    )
