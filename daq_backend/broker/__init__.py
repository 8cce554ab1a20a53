"""Broker protocol (request / kill / status) over RabbitMQ or an embedded transport."""

from daq_backend.broker.aggregator import StatusAggregator, StatusMessage
from daq_backend.broker.client import BrokerClient
from daq_backend.broker.embedded import EmbeddedTransport
from daq_backend.broker.embedded_hub import EmbeddedBrokerHub
from daq_backend.broker.listener import StatusListener, format_status, run_listener
from daq_backend.broker.protocol import (
    FINAL_ACTIONS,
    KILL_EXCHANGE,
    REQUEST_EXCHANGE,
    STATUS_EXCHANGE,
    Action,
    Message,
    NoRouteError,
    Transport,
    topic_matches,
)
from daq_backend.broker.rabbitmq import RabbitMQTransport
from daq_backend.broker.service import BrokerService, RequestContext
from daq_backend.broker.transport import make_transport, resolve_broker_url

__all__ = [
    "FINAL_ACTIONS",
    "KILL_EXCHANGE",
    "REQUEST_EXCHANGE",
    "STATUS_EXCHANGE",
    "Action",
    "BrokerClient",
    "BrokerService",
    "EmbeddedBrokerHub",
    "EmbeddedTransport",
    "Message",
    "NoRouteError",
    "RabbitMQTransport",
    "RequestContext",
    "StatusAggregator",
    "StatusListener",
    "StatusMessage",
    "Transport",
    "format_status",
    "make_transport",
    "resolve_broker_url",
    "run_listener",
    "topic_matches",
]
