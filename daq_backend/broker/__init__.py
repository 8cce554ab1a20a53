"""Broker protocol (request / kill / status) over RabbitMQ or an embedded transport."""
