"""The requesting side of the protocol: send requests and kills to the services of a tag."""

from __future__ import annotations

import json
import uuid
from typing import Any

from daq_backend.broker.protocol import DEADLINE_HEADER, KILL_EXCHANGE, REQUEST_EXCHANGE, Message, Transport


class BrokerClient:
    """Publishes on ``request`` / ``kill`` with routing key ``tag``, as the seed's client does.

    Requests are published ``mandatory``: a request nobody listens for raises ``NoRouteError``
    (a ``ConnectionError``) instead of vanishing. Statuses are read with a ``StatusAggregator``,
    which must be started before the request is sent.
    """

    def __init__(self, transport: Transport, tag: str) -> None:
        self.transport = transport
        self.tag = tag

    def request(
        self,
        body: dict[str, Any],
        request_id: str | None = None,
        *,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> str:
        """Send ``body`` (a JSON object) and return its request id (a new uuid4 by default).

        Ids must be unique: a service runs each request id at most once (redeliveries are ignored).
        ``deadline`` (``time.time()`` seconds): a service that gets the request later refuses it as
        expired. ``timeout``: give up the publish (``ConnectionError``) after this many seconds.
        """
        if not isinstance(body, dict):
            raise TypeError(f"A request body must be a dict (JSON object), got {type(body).__name__}")
        try:
            payload = json.dumps(body).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Request body is not JSON-serialisable: {exc}") from exc
        request_id = request_id or str(uuid.uuid4())
        headers: dict[str, Any] = {} if deadline is None else {DEADLINE_HEADER: float(deadline)}
        self.transport.publish(
            Message(exchange=REQUEST_EXCHANGE, routing_key=self.tag, body=payload, correlation_id=request_id,
                    headers=headers),
            mandatory=True,
            timeout=timeout,
        )
        return request_id

    def kill(self, request_id: str, finish: bool = False, *, timeout: float | None = None) -> None:
        """Ask the services of the tag to kill ``request_id`` (empty body, as the seed). ``finish``:
        end it now as done, keeping what it has (body ``{"finish": true}``; services that do not know
        the difference kill it)."""
        body = json.dumps({"finish": True}).encode() if finish else b""
        self.transport.publish(
            Message(exchange=KILL_EXCHANGE, routing_key=self.tag, body=body, correlation_id=request_id),
            timeout=timeout,
        )
