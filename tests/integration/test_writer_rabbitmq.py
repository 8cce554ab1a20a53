"""A plain ``pika`` client that knows only the seed protocol drives the writer on the real RabbitMQ
(127.0.0.1:5672, a private vhost): a write to the end, then a kill mid-run."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pika
import pytest

from daq_backend.broker import make_transport
from daq_backend.testing.writer import WAIT_S, FakeAssembler, make_config, unique
from daq_backend.writer import layout
from daq_backend.writer.agent import DetectorWriter

pytestmark = pytest.mark.rabbitmq


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=180)


@pytest.fixture
def vhost_url() -> Iterator[str]:
    vhost = unique("std-daq-writer-test")
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{urllib.parse.quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


class SeedClient:
    """What a seed-era client does, with nothing from this project."""

    def __init__(self, url: str, tag: str) -> None:
        self.tag = tag
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        for exchange in ("request", "kill", "status"):
            self.channel.exchange_declare(exchange=exchange, exchange_type="topic")
        self.queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.channel.queue_bind(queue=self.queue, exchange="status", routing_key=tag)

    def request(self, body: dict[str, Any]) -> tuple[str, bytes]:
        request_id = str(uuid.uuid4())
        payload = json.dumps(body).encode()
        properties = pika.BasicProperties(correlation_id=request_id)
        self.channel.basic_publish("request", self.tag, payload, properties)
        return request_id, payload

    def kill(self, request_id: str) -> None:
        self.channel.basic_publish("kill", self.tag, b"", pika.BasicProperties(correlation_id=request_id))

    def statuses(self, request_id: str, until: str) -> Iterator[tuple[dict[str, Any], bytes]]:
        """Status (headers, body) of ``request_id`` until the action ``until`` or a failure."""
        try:
            for method, properties, body in self.channel.consume(self.queue, auto_ack=True,
                                                                inactivity_timeout=WAIT_S):
                assert method is not None, f"no status within {WAIT_S} s"
                if properties.correlation_id != request_id:
                    continue
                yield properties.headers, body
                if properties.headers["action"] in (until, "request_fail"):
                    break
        finally:
            self.channel.cancel()

    def close(self) -> None:
        self.connection.close()


def test_a_seed_pika_client_drives_a_write_and_a_kill(vhost_url: str, tmp_path: Path) -> None:
    config = make_config()
    assembler = FakeAssembler(config).start(rate_hz=100)
    transport = make_transport(vhost_url)
    writer = DetectorWriter(config, transport, "writer_agent", config.detector_name).start()
    client = SeedClient(vhost_url, config.detector_name)
    try:
        path = tmp_path / "seed.h5"
        body = {"sources": "jungfrau", "n_images": 25, "output_file": str(path)}
        request_id, payload = client.request(body)
        seen = list(client.statuses(request_id, "request_success"))
        actions = [headers["action"] for headers, _ in seen]
        assert actions[0] == "request_start" and actions[-1] == "request_success", seen
        assert set(actions[1:-1]) <= {"request_progress"}
        for headers, body in seen:
            assert headers["source"] == "writer_agent" and body == payload
        result = seen[-1][0]["message"]
        assert (result["output_file"], result["n_written"], result["status"]) == (str(path), 25, "completed")
        with h5py.File(path, "r") as h5:
            assert h5.attrs["status"] == "completed" and h5[layout.DATA].shape[0] == 25

        killed = tmp_path / "killed.h5"
        request_id, _ = client.request({"n_images": 100_000, "output_file": str(killed)})
        for headers, _ in client.statuses(request_id, "request_success"):
            assert headers["action"] in ("request_start", "request_progress"), headers
            if headers["action"] == "request_progress" and headers["message"]["n_written"] >= 5:
                break
        client.kill(request_id)
        final = list(client.statuses(request_id, "request_success"))[-1][0]
        assert final["action"] == "request_fail"
        assert final["message"].startswith("Interrupted: killed after ")
        assert final["message"].endswith(f"images; file {killed} is valid")
        with h5py.File(killed, "r") as h5:
            assert h5.attrs["status"] == "interrupted" and h5.attrs["n_written"] >= 1
    finally:
        client.close()
        writer.stop()
        transport.close()
        assembler.close()
