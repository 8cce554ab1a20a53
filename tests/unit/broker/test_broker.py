"""Broker protocol suite, run on both transports (embedded hub and the real RabbitMQ server).

RabbitMQ tests use a private vhost (created with rabbitmqctl) and unique tags, so they neither see
nor disturb other test runs' services. The broker outage is a TCP proxy between the transports and
RabbitMQ that the test cuts and restores: the machine's broker keeps serving everybody else.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from daq_backend.broker import (
    KILL_EXCHANGE,
    REQUEST_EXCHANGE,
    STATUS_EXCHANGE,
    Action,
    BrokerClient,
    BrokerService,
    EmbeddedBrokerHub,
    EmbeddedTransport,
    Message,
    NoRouteError,
    RabbitMQTransport,
    RequestContext,
    StatusAggregator,
    StatusListener,
    StatusMessage,
    Transport,
    make_transport,
    run_listener,
    topic_matches,
)
from daq_backend.broker.embedded_hub import hub_directory, hub_is_running
from daq_backend.broker.transport import resolve_broker_url
from daq_backend.testing import wait_for
from daq_backend.testing.broker_proxy import BrokerProxy

WAIT_S = 60.0  # generous: the test machine's cores are shared


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def rabbit_url() -> Iterator[str]:
    """A private vhost on the real server at 127.0.0.1:5672 (never skipped)."""
    vhost = _unique("std-daq-test")
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@127.0.0.1:5672/{urllib.parse.quote(vhost, safe='')}"
    _rabbitmqctl("delete_vhost", vhost)


class Recorder:
    """Collects every StatusMessage an aggregator sees, in arrival order."""

    def __init__(self, aggregator: StatusAggregator) -> None:
        self.messages: list[StatusMessage] = []
        self._condition = threading.Condition()
        aggregator.add_listener(self._on_status)

    def _on_status(self, message: StatusMessage) -> None:
        with self._condition:
            self.messages.append(message)
            self._condition.notify_all()

    def wait_for(self, request_id: str, action: Action, timeout: float = WAIT_S) -> StatusMessage:
        def found() -> StatusMessage | None:
            for message in self.messages:
                if message.request_id == request_id and message.action == action:
                    return message
            return None

        with self._condition:
            if not self._condition.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {action.value} for {request_id}; got {self.messages}")
            result = found()
            assert result is not None
            return result

    def actions(self) -> list[tuple[str, Action]]:
        with self._condition:
            return [(message.request_id, message.action) for message in self.messages]


class Bus:
    """Transports, services and clients of one test on one kind of transport."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.tag = _unique("tag")
        self._closers: list[Callable[[], None]] = []

    def transport(self, **options: Any) -> Transport:
        transport = make_transport(self.url, **options)
        self._closers.append(transport.close)
        return transport

    def service(
        self,
        on_request: Callable[[RequestContext], Any],
        on_kill: Callable[[str], None] | None = None,
        name: str = "svc",
    ) -> BrokerService:
        service = BrokerService(self.transport(), name, self.tag, on_request, on_kill)
        service.start()
        self._closers.append(service.stop)
        return service

    def observer(self) -> tuple[BrokerClient, StatusAggregator, Recorder]:
        transport = self.transport()
        aggregator = StatusAggregator(transport, self.tag)
        recorder = Recorder(aggregator)
        aggregator.start()
        self._closers.append(aggregator.stop)
        return BrokerClient(transport, self.tag), aggregator, recorder

    def close(self) -> None:
        for close in reversed(self._closers):
            close()


@pytest.fixture
def hub() -> Iterator[EmbeddedBrokerHub]:
    hub = EmbeddedBrokerHub(_unique("test"))
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(params=["embedded", "rabbitmq"])
def bus(request: pytest.FixtureRequest, rabbit_url: str) -> Iterator[Bus]:
    if request.param == "embedded":
        hub = EmbeddedBrokerHub(_unique("test"))
        hub.start()
        bus = Bus("embedded", hub.broker_url)
        yield bus
        bus.close()
        hub.stop()
        assert not os.path.exists(hub.directory)
    else:
        bus = Bus("rabbitmq", rabbit_url)
        yield bus
        bus.close()


# ---------------------------------------------------------------------- protocol suite (both transports)


def test_request_gives_exactly_start_then_success_with_return_value(bus: Bus) -> None:
    request = {"just": "a", "request": "yeey", "n": 3}
    bus.service(lambda ctx: {"got": ctx.request, "id": ctx.request_id, "ratio": 0.1 + 0.2})
    client, aggregator, recorder = bus.observer()

    request_id = client.request(request)
    done = aggregator.wait_for_complete(request_id, timeout=WAIT_S)

    assert done["status"] == Action.SUCCESS == "request_success"
    assert done["request_details"] == request
    assert done["services"] == {
        "svc": [
            (Action.START, None),
            (Action.SUCCESS, {"got": request, "id": request_id, "ratio": 0.1 + 0.2}),
        ]
    }
    assert all(message.request == request for message in recorder.messages)
    assert aggregator.status(request_id)["request"] == request


def test_failing_callback_reports_fail_with_error_text(bus: Bus) -> None:
    error_message = "This is an expected error. Carry on."

    def on_request(ctx: RequestContext) -> str:
        if not ctx.request:
            raise ValueError(error_message)
        return "ok"

    bus.service(on_request)
    client, aggregator, recorder = bus.observer()

    good = client.request({"a": 1})
    assert aggregator.wait_for_complete(good, timeout=WAIT_S)["status"] == Action.SUCCESS
    bad = client.request({})
    done = aggregator.wait_for_complete(bad, timeout=WAIT_S)

    assert done["status"] == Action.FAIL
    assert done["services"]["svc"] == [(Action.START, None), (Action.FAIL, error_message)]
    assert recorder.actions() == [
        (good, Action.START),
        (good, Action.SUCCESS),
        (bad, Action.START),
        (bad, Action.FAIL),
    ]


def test_kill_reaches_the_running_request(bus: Bus) -> None:
    kills: list[str] = []

    def on_request(ctx: RequestContext) -> None:
        if not ctx.killed.wait(WAIT_S):
            raise AssertionError("never killed")
        raise RuntimeError(f"killed after {ctx.request['n']} images")

    bus.service(on_request, on_kill=kills.append)
    client, aggregator, recorder = bus.observer()

    request_id = client.request({"n": 5})
    recorder.wait_for(request_id, Action.START)
    client.kill(request_id)
    done = aggregator.wait_for_complete(request_id, timeout=WAIT_S)

    assert kills == [request_id]
    assert done["status"] == Action.FAIL
    assert done["services"]["svc"][-1] == (Action.FAIL, "killed after 5 images")


def test_kill_of_unknown_id_fails_clearly_and_service_keeps_serving(bus: Bus) -> None:
    kills: list[str] = []
    bus.service(lambda ctx: "served", on_kill=kills.append)
    client, aggregator, _ = bus.observer()

    unknown = str(uuid.uuid4())
    client.kill(unknown)
    done = aggregator.wait_for_complete(unknown, timeout=WAIT_S)
    assert done["status"] == Action.FAIL
    assert done["services"] == {"svc": [(Action.FAIL, f"Unknown request id {unknown}: nothing to kill")]}
    assert kills == []

    request_id = client.request({"after": "kill"})
    assert aggregator.wait_for_complete(request_id, timeout=WAIT_S)["services"]["svc"][-1] == (
        Action.SUCCESS,
        "served",
    )


def test_malformed_request_fails_and_service_keeps_serving(bus: Bus) -> None:
    bus.service(lambda ctx: sorted(ctx.request))
    client, aggregator, _ = bus.observer()

    results = {}
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        request_id = str(uuid.uuid4())
        client.transport.publish(
            Message(REQUEST_EXCHANGE, bus.tag, body, request_id, {}),
            mandatory=True,
        )
        results[body] = aggregator.wait_for_complete(request_id, timeout=WAIT_S)

    for body, done in results.items():
        assert done["status"] == Action.FAIL, body
        assert done["request_details"] is None
        ((action, message),) = done["services"]["svc"]
        assert action == Action.FAIL
        assert message.startswith("Malformed request: ")
    assert "not valid JSON" in results[b"{not json"]["services"]["svc"][0][1]
    assert "must be a JSON object, got list" in results[b"[1, 2]"]["services"]["svc"][0][1]

    request_id = client.request({"b": 1, "a": 2})
    assert aggregator.wait_for_complete(request_id, timeout=WAIT_S)["services"]["svc"][-1] == (
        Action.SUCCESS,
        ["a", "b"],
    )


def test_one_request_at_a_time_per_service_instance(bus: Bus) -> None:
    gate = threading.Event()
    lock = threading.Lock()
    active = [0]
    max_active = [0]

    def on_request(ctx: RequestContext) -> int:
        with lock:
            active[0] += 1
            max_active[0] = max(max_active[0], active[0])
        try:
            if not gate.wait(WAIT_S):
                raise AssertionError("gate never opened")
            return int(ctx.request["i"])
        finally:
            with lock:
                active[0] -= 1

    bus.service(on_request)
    client, aggregator, recorder = bus.observer()

    first = client.request({"i": 1})
    recorder.wait_for(first, Action.START)
    second = client.request({"i": 2})  # routed and queued behind the first
    time.sleep(0.5)  # gives a wrong (concurrent) service the chance to start it; never asserted on
    gate.set()
    assert aggregator.wait_for_complete(first, timeout=WAIT_S)["status"] == Action.SUCCESS
    assert aggregator.wait_for_complete(second, timeout=WAIT_S)["status"] == Action.SUCCESS

    assert max_active[0] == 1
    assert recorder.actions() == [
        (first, Action.START),
        (first, Action.SUCCESS),
        (second, Action.START),
        (second, Action.SUCCESS),
    ]


def test_kill_of_a_queued_request_refuses_it_when_it_arrives(bus: Bus) -> None:
    gate = threading.Event()
    bus.service(lambda ctx: gate.wait(WAIT_S))
    client, aggregator, recorder = bus.observer()

    first = client.request({"i": 1})
    recorder.wait_for(first, Action.START)
    queued = client.request({"i": 2})
    client.kill(queued)
    recorder.wait_for(queued, Action.FAIL)
    gate.set()

    assert aggregator.wait_for_complete(first, timeout=WAIT_S)["status"] == Action.SUCCESS
    wait_for(lambda: len(aggregator.status(queued)["services"]["svc"]) == 2, "the refusal")
    assert aggregator.status(queued)["services"]["svc"] == [
        (Action.FAIL, f"Unknown request id {queued}: nothing to kill"),
        (Action.FAIL, f"Request {queued} was killed before it started"),
    ]
    assert aggregator.status(queued)["request"] == {"i": 2}


def test_progress_messages_reach_the_aggregator(bus: Bus) -> None:
    def on_request(ctx: RequestContext) -> dict[str, int]:
        n_images = ctx.request["n_images"]
        for n_written in range(1, n_images + 1):
            ctx.publish_progress({"n_written": n_written, "n_images": n_images})
        return {"n_written": n_images}

    bus.service(on_request, name="writer")
    client, aggregator, _ = bus.observer()

    request_id = client.request({"n_images": 3})
    done = aggregator.wait_for_complete(request_id, timeout=WAIT_S)

    assert done["services"]["writer"] == [
        (Action.START, None),
        (Action.PROGRESS, {"n_written": 1, "n_images": 3}),
        (Action.PROGRESS, {"n_written": 2, "n_images": 3}),
        (Action.PROGRESS, {"n_written": 3, "n_images": 3}),
        (Action.SUCCESS, {"n_written": 3}),
    ]


def test_wait_for_complete_times_out_then_completes(bus: Bus) -> None:
    gate = threading.Event()
    bus.service(lambda ctx: gate.wait(WAIT_S))
    client, aggregator, recorder = bus.observer()

    with pytest.raises(TimeoutError, match="no status at all"):
        aggregator.wait_for_complete(str(uuid.uuid4()), timeout=0.05)
    request_id = client.request({"slow": True})
    recorder.wait_for(request_id, Action.START)
    with pytest.raises(TimeoutError, match=f"Request {request_id} not complete after 0.2 s"):
        aggregator.wait_for_complete(request_id, timeout=0.2)
    gate.set()
    assert aggregator.wait_for_complete(request_id)["services"]["svc"][-1] == (Action.SUCCESS, True)


def test_result_that_is_not_json_fails(bus: Bus) -> None:
    bus.service(lambda ctx: {1, 2})
    client, aggregator, _ = bus.observer()
    done = aggregator.wait_for_complete(client.request({}), timeout=WAIT_S)
    assert done["status"] == Action.FAIL
    assert "is not JSON-serialisable" in done["services"]["svc"][-1][1]


def test_request_to_a_tag_nobody_serves_raises(bus: Bus) -> None:
    client = BrokerClient(bus.transport(route_timeout=0.3), _unique("nobody"))
    with pytest.raises(NoRouteError, match="is a service listening on that tag"):
        client.request({"n": 1})
    with pytest.raises(TypeError, match="must be a dict"):
        client.request([1, 2])  # type: ignore[arg-type]


def test_topic_wildcards_route_like_amqp(bus: Bus) -> None:
    transport = bus.transport()
    exchange_base = bus.tag
    got: dict[str, list[str]] = {"one": [], "any": [], "exact": []}
    cond = threading.Condition()

    def collect(name: str) -> Callable[[Message], None]:
        def callback(message: Message) -> None:
            with cond:
                got[name].append(message.routing_key)
                cond.notify_all()

        return callback

    transport.consume(STATUS_EXCHANGE, f"{exchange_base}.*", collect("one"))
    transport.consume(STATUS_EXCHANGE, f"{exchange_base}.#", collect("any"))
    transport.consume(STATUS_EXCHANGE, f"{exchange_base}.a", collect("exact"))
    publisher = bus.transport()
    for key in ("a", "a.b", "", "b", "end"):
        routing_key = f"{exchange_base}.{key}" if key else exchange_base
        publisher.publish(Message(STATUS_EXCHANGE, routing_key, b"{}", "id"))
    with cond:  # per-publisher order: once "end" arrived everywhere, nothing else is on its way
        assert cond.wait_for(lambda: got["one"][-1:] == got["any"][-1:] == [f"{exchange_base}.end"], WAIT_S)
    base = exchange_base
    assert got["one"] == [f"{base}.a", f"{base}.b", f"{base}.end"]
    assert got["any"] == [f"{base}.a", f"{base}.a.b", base, f"{base}.b", f"{base}.end"]
    assert got["exact"] == [f"{base}.a"]


def test_listener_prints_one_coloured_line_per_update(bus: Bus) -> None:
    bus.service(lambda ctx: "done", name="writer_agent")
    client, aggregator, _ = bus.observer()
    out = io.StringIO()
    listener = StatusListener(client.transport, bus.tag, out=out)
    listener.start()
    try:
        request_id = client.request({"output_file": "/tmp/x.h5"})
        aggregator.wait_for_complete(request_id, timeout=WAIT_S)
        short = f"[{request_id[:4]}..{request_id[-4:]}]"
        wait_for(lambda: f"{short} [+] writer_agent" in out.getvalue(), "the success line")
    finally:
        listener.stop()
    assert out.getvalue().splitlines() == [f"{short} [*] writer_agent", f"{short} [+] writer_agent"]


def test_run_listener_prints_until_stopped(hub: EmbeddedBrokerHub) -> None:
    tag = _unique("tag")
    out = io.StringIO()
    stop = threading.Event()
    thread = threading.Thread(target=run_listener, args=(hub.broker_url, tag, out, stop))
    thread.start()
    transport = EmbeddedTransport(hub.name)
    try:
        wait_for(lambda: "Listening for status messages" in out.getvalue(), "the listener to start")
        request_id = str(uuid.uuid4())
        headers = {"action": "request_fail", "source": "writer_agent", "message": "disk full"}
        transport.publish(Message(STATUS_EXCHANGE, tag, b"{}", request_id, headers))
        expected = f"[{request_id[:4]}..{request_id[-4:]}] [-] writer_agent  writer_agent: disk full"
        wait_for(lambda: expected in out.getvalue(), "the fail line")
    finally:
        stop.set()
        thread.join(WAIT_S)
        transport.close()
    assert not thread.is_alive()


def test_stop_kills_the_running_request_and_reports_it(bus: Bus) -> None:
    started = threading.Event()

    def on_request(ctx: RequestContext) -> None:
        started.set()
        if ctx.killed.wait(WAIT_S):
            raise RuntimeError("interrupted by shutdown")

    service = bus.service(on_request)
    client, aggregator, _ = bus.observer()
    request_id = client.request({})
    assert started.wait(WAIT_S)
    service.stop()
    done = aggregator.wait_for_complete(request_id, timeout=WAIT_S)
    assert done["services"]["svc"][-1] == (Action.FAIL, "interrupted by shutdown")
    assert service.current_request_id is None


# ---------------------------------------------------------------------- embedded transport specifics


def _serve_in_child(hub_name: str, tag: str, ready: Any, done: Any) -> None:
    transport = EmbeddedTransport(hub_name)
    service = BrokerService(transport, "child", tag, lambda ctx: {"pid": os.getpid(), "echo": ctx.request})
    service.start()
    ready.set()
    done.wait(WAIT_S * 2)
    service.stop()
    transport.close()


def test_embedded_transport_works_across_processes(hub: EmbeddedBrokerHub) -> None:
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    tag = _unique("tag")
    child = context.Process(target=_serve_in_child, args=(hub.name, tag, ready, done))
    child.start()
    transport = make_transport(hub.broker_url)
    try:
        assert ready.wait(WAIT_S * 2), "child service did not start"
        with StatusAggregator(transport, tag) as aggregator:
            request_id = BrokerClient(transport, tag).request({"from": "parent"})
            result = aggregator.wait_for_complete(request_id, timeout=WAIT_S)
        assert result["services"]["child"][-1] == (
            Action.SUCCESS,
            {"pid": child.pid, "echo": {"from": "parent"}},
        )
        assert child.pid != os.getpid()
        done.set()
        child.join(WAIT_S)
        assert child.exitcode == 0
    finally:
        transport.close()
        if child.is_alive():
            child.terminate()
            child.join(10)


def test_embedded_without_hub_says_how_to_start_one() -> None:
    name = _unique("nohub")
    with pytest.raises(ConnectionError, match=r"Start the DAQ with `std-daq up CONFIG`.*--broker_url"):
        EmbeddedTransport(name)
    with pytest.raises(ConnectionError, match="No embedded broker hub"):
        make_transport(f"embedded://{name}")
    assert not os.path.exists(hub_directory(name))


def test_embedded_hub_name_is_exclusive_per_host(hub: EmbeddedBrokerHub) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        EmbeddedBrokerHub(hub.name).start()
    with pytest.raises(ValueError, match="Invalid embedded broker name"):
        EmbeddedBrokerHub("../etc")


def _hold(running: Any, release: Any) -> None:
    running.set()
    release.wait(WAIT_S)


def test_embedded_hub_lock_is_not_kept_by_forked_children() -> None:
    """If the hub's process dies, a child it forked must not make the hub look alive."""
    hub = EmbeddedBrokerHub(_unique("fork"))
    hub.start()
    context = multiprocessing.get_context("fork")
    running, release = context.Event(), context.Event()
    child = context.Process(target=_hold, args=(running, release))
    child.start()
    try:
        assert running.wait(WAIT_S)  # past its at-fork hooks
        lock_fd, hub._lock_fd = hub._lock_fd, None
        assert lock_fd is not None
        os.close(lock_fd)  # what the kernel does to the hub's descriptors when its process dies
        assert not hub_is_running(hub.name)
    finally:
        release.set()
        child.join(WAIT_S)
        hub.stop()


def test_embedded_clients_resubscribe_after_a_hub_restart() -> None:
    name = _unique("restart")
    first_hub = EmbeddedBrokerHub(name)
    first_hub.start()
    tag = _unique("tag")
    service_transport = EmbeddedTransport(name)
    client_transport = EmbeddedTransport(name, route_timeout=WAIT_S)
    served: list[int] = []
    service = BrokerService(service_transport, "survivor", tag, lambda ctx: served.append(ctx.request["n"]))
    second_hub: EmbeddedBrokerHub | None = None
    try:
        service.start()
        with StatusAggregator(client_transport, tag) as aggregator:
            client = BrokerClient(client_transport, tag)
            first = client.request({"n": 1})
            assert aggregator.wait_for_complete(first, timeout=WAIT_S)["status"] == Action.SUCCESS
            first_hub.stop()
            second_hub = EmbeddedBrokerHub(name)
            second_hub.start()
            # The hub answers UNKNOWN until the client re-subscribed its status consumer, and the
            # mandatory request is retried until the service has re-subscribed too.
            second = client.request({"n": 2})
            assert aggregator.wait_for_complete(second, timeout=WAIT_S)["status"] == Action.SUCCESS
        assert served == [1, 2]
    finally:
        service.stop()
        service_transport.close()
        client_transport.close()
        (second_hub or first_hub).stop()


# ---------------------------------------------------------------------- transport selection and topics


@pytest.mark.parametrize(
    ("binding", "key", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "", True),
        ("*", "", False),
        ("#.c", "a.b.c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.b.d", False),
        ("*.b.#", "x.b", True),
        ("writer", "writer_agent", False),
    ],
)
def test_topic_matches(binding: str, key: str, matches: bool) -> None:
    assert topic_matches(binding, key) is matches


def test_broker_url_resolution(
    monkeypatch: pytest.MonkeyPatch, hub: EmbeddedBrokerHub, rabbit_url: str
) -> None:
    monkeypatch.delenv("BROKER_URL", raising=False)
    monkeypatch.delenv("BROKER_HOST", raising=False)
    assert resolve_broker_url() == "embedded"
    monkeypatch.setenv("BROKER_HOST", "rabbit.example:5673")
    assert resolve_broker_url() == "amqp://guest:guest@rabbit.example:5673/%2F"
    monkeypatch.setenv("BROKER_URL", hub.broker_url)
    transport = make_transport()
    try:
        assert isinstance(transport, EmbeddedTransport) and transport.name == hub.name
    finally:
        transport.close()
    assert resolve_broker_url("amqp://h") == "amqp://h"
    rabbit = make_transport(rabbit_url)
    try:
        assert isinstance(rabbit, RabbitMQTransport)
    finally:
        rabbit.close()
    with pytest.raises(ValueError, match="Unsupported broker URL 'redis://x'"):
        make_transport("redis://x")
    with pytest.raises(ConnectionError, match="Cannot connect to RabbitMQ at 127.0.0.1:1 .*--broker_url"):
        make_transport("amqp://guest:guest@127.0.0.1:1/%2F", connect_timeout=5)


def test_request_context_outside_a_service() -> None:
    seen: list[Any] = []
    ctx = RequestContext("id", {"n": 1}, progress_callback=seen.append)
    ctx.publish_progress({"n_written": 1})
    RequestContext("id", {}).publish_progress("goes nowhere")
    assert seen == [{"n_written": 1}]
    assert not ctx.killed.is_set()


# ---------------------------------------------------------------------- RabbitMQ only


def test_plain_pika_seed_client_drives_a_service(rabbit_url: str) -> None:
    """A client that knows only the seed protocol: exchanges, routing key, correlation id, headers."""
    tag = _unique("writer")
    transport = RabbitMQTransport(rabbit_url)
    service = BrokerService(
        transport,
        "writer_agent",
        tag,
        lambda ctx: {"output_file": ctx.request["output_file"], "n_written": 3},
    )
    service.start()
    connection = pika.BlockingConnection(pika.URLParameters(rabbit_url))
    try:
        channel = connection.channel()
        for exchange in (REQUEST_EXCHANGE, KILL_EXCHANGE, STATUS_EXCHANGE):
            channel.exchange_declare(exchange=exchange, exchange_type="topic")
        queue = channel.queue_declare(queue="", exclusive=True).method.queue
        channel.queue_bind(queue=queue, exchange=STATUS_EXCHANGE, routing_key=tag)

        request_id = str(uuid.uuid4())
        body = json.dumps({"output_file": "/tmp/seed.h5", "n_images": 3}).encode()
        channel.basic_publish(REQUEST_EXCHANGE, tag, body, pika.BasicProperties(correlation_id=request_id))

        received = []
        for method, properties, status_body in channel.consume(
            queue, auto_ack=True, inactivity_timeout=WAIT_S
        ):
            assert method is not None, f"no status within {WAIT_S} s; got {received}"
            received.append((properties, status_body))
            if len(received) == 2:
                break
        channel.cancel()
    finally:
        connection.close()
        service.stop()
        transport.close()

    assert [properties.headers["action"] for properties, _ in received] == [
        "request_start",
        "request_success",
    ]
    for properties, status_body in received:
        assert properties.correlation_id == request_id
        assert properties.headers["source"] == "writer_agent"
        assert status_body == body
    assert received[0][0].headers["message"] is None
    assert received[1][0].headers["message"] == {"output_file": "/tmp/seed.h5", "n_written": 3}


def test_rabbitmq_tolerates_a_fanout_status_exchange(rabbit_url: str) -> None:
    """The seed's later ``status`` exchange is fanout: a vhost that has it still works."""
    vhost_url = rabbit_url  # the module vhost already has a topic 'status'; use a fresh exchange name
    exchange = _unique("status-fanout")
    connection = pika.BlockingConnection(pika.URLParameters(vhost_url))
    try:
        connection.channel().exchange_declare(exchange=exchange, exchange_type="fanout", auto_delete=True)
        transport = RabbitMQTransport(vhost_url)
        try:
            got = threading.Event()
            transport.consume(exchange, "anything", lambda message: got.set())
            transport.publish(Message(exchange, "other", b"{}", "id", {"message": 1.5}))
            assert got.wait(WAIT_S)
        finally:
            transport.close()
    finally:
        connection.close()


def test_rabbitmq_rebinds_a_consumer_channel_the_broker_closed(rabbit_url: str) -> None:
    """RabbitMQ closes the channel of a delivery unacked for longer than its consumer_timeout (a
    long request): the service must keep consuming, and the running request must not run twice."""
    tag = _unique("long")
    gate = threading.Event()
    served: list[int] = []

    def on_request(ctx: RequestContext) -> int:
        served.append(ctx.request["n"])
        if not gate.wait(WAIT_S):
            raise AssertionError("gate never opened")
        return int(ctx.request["n"])

    service_transport = RabbitMQTransport(rabbit_url)
    client_transport = RabbitMQTransport(rabbit_url)
    service = BrokerService(service_transport, "long", tag, on_request)
    aggregator = StatusAggregator(client_transport, tag)
    recorder = Recorder(aggregator)
    try:
        service.start()
        aggregator.start()
        client = BrokerClient(client_transport, tag)
        first = client.request({"n": 1})
        recorder.wait_for(first, Action.START)
        consumer = next(c for c in service_transport._consumers.values() if c.exclusive_work)
        old_channel = consumer.channel
        assert old_channel is not None

        def provoke_channel_close(future: Any) -> None:  # an unknown delivery tag: 406, channel closed
            old_channel.basic_ack(delivery_tag=10**6)
            future.set_result(None)

        service_transport._submit(provoke_channel_close)
        wait_for(lambda: consumer.channel is not old_channel, "the consumer to be bound again")
        gate.set()
        assert aggregator.wait_for_complete(first, timeout=WAIT_S)["status"] == Action.SUCCESS
        second = client.request({"n": 2})
        assert aggregator.wait_for_complete(second, timeout=WAIT_S)["status"] == Action.SUCCESS
        assert served == [1, 2]
        assert aggregator.status(first)["services"]["long"] == [(Action.START, None), (Action.SUCCESS, 1)]
    finally:
        gate.set()
        aggregator.stop()
        service.stop()
        client_transport.close()
        service_transport.close()


def _wait_for_rabbitmq(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
            return
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_zz_rabbitmq_outage_during_idle_period(rabbit_url: str) -> None:
    """The broker goes away (every connection dropped, new ones refused) and comes back: the same
    service object serves on, a request sent during the outage is delivered once it is back."""
    proxy = BrokerProxy().start()
    try:
        _outage_during_idle_period(rabbit_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}"), proxy)
    finally:
        proxy.close()


def _outage_during_idle_period(rabbit_url: str, proxy: BrokerProxy) -> None:
    tag = _unique("survivor")
    served: list[int] = []
    service_transport = RabbitMQTransport(rabbit_url, retry_interval=0.2, reconnect_timeout=180)
    client_transport = RabbitMQTransport(
        rabbit_url, retry_interval=0.2, reconnect_timeout=180, route_timeout=180
    )
    impatient = RabbitMQTransport(rabbit_url, reconnect_timeout=0.5)
    service = BrokerService(
        service_transport, "survivor", tag, lambda ctx: served.append(ctx.request["n"]) or id(service)
    )
    aggregator = StatusAggregator(client_transport, tag)
    client = BrokerClient(client_transport, tag)
    outcome: dict[str, Any] = {}

    def request_during_outage() -> None:
        try:
            outcome["id"] = client.request({"n": 2})
        except Exception as exc:
            outcome["error"] = exc

    try:
        service.start()
        aggregator.start()
        first = client.request({"n": 1})
        assert aggregator.wait_for_complete(first, timeout=WAIT_S)["services"]["survivor"][-1] == (
            Action.SUCCESS,
            id(service),
        )
        generation = service_transport.generation
        thread = threading.Thread(target=request_during_outage)
        try:
            proxy.cut()
            with pytest.raises(ConnectionError, match=r"unreachable for 0.5 s .*failed"):
                BrokerClient(impatient, tag).request({"n": 0})
            with pytest.raises(ConnectionError, match="Cannot connect to RabbitMQ"):
                RabbitMQTransport(rabbit_url, connect_timeout=5)
            wait_for(lambda: not client_transport.connected, "the client to see the outage")
            thread.start()  # retries until the broker is back
        finally:
            proxy.restore()
        _wait_for_rabbitmq(rabbit_url)
        thread.join(200)
        assert "error" not in outcome, outcome
        second = outcome["id"]
        done = aggregator.wait_for_complete(second, timeout=180)
        assert done["services"] == {"survivor": [(Action.START, None), (Action.SUCCESS, id(service))]}
        third = client.request({"n": 3})
        assert aggregator.wait_for_complete(third, timeout=WAIT_S)["status"] == Action.SUCCESS
        assert served == [1, 2, 3]
        assert service_transport.generation > generation
    finally:
        aggregator.stop()
        service.stop()
        for transport in (impatient, client_transport, service_transport):
            transport.close()
