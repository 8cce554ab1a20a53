"""One write at a time, on both interfaces: a write while another is queued or running is refused
(REST 409 naming the running request; broker ``request_fail`` "busy: ..." naming it), never queued to
run later, and every answer describes its own request.

Concurrent submissions from threads: through the REST API (seed and admin endpoints, in-process DAQ
with the real writer) and straight to a service on RabbitMQ.
"""

from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from daq_backend.broker import (
    REQUEST_EXCHANGE,
    Action,
    BrokerClient,
    BrokerService,
    StatusAggregator,
    make_transport,
)
from daq_backend.broker.service import RequestContext
from daq_backend.rest import backend as backend_module
from daq_backend.testing import RABBITMQ_URL, wait_for
from daq_backend.testing.rest import WAIT_S, RestHarness

N_CLIENTS = 8


def _concurrently(rest: RestHarness, path: str) -> list[tuple[str, httpx.Response]]:
    """``N_CLIENTS`` threads POST a write of their own file to ``path`` at the same moment."""
    start = threading.Barrier(N_CLIENTS)

    def submit(i: int) -> tuple[str, httpx.Response]:
        output = rest.file(f"{path.strip('/').replace('/', '-')}-{i}.h5")
        with httpx.Client(base_url=rest.url, timeout=WAIT_S) as http:
            start.wait()
            return output, http.post(path, json={"n_images": 10_000, "output_file": output})

    with ThreadPoolExecutor(N_CLIENTS) as pool:
        return list(pool.map(submit, range(N_CLIENTS)))


def test_concurrent_write_async_one_accepted_the_others_409(rest: RestHarness) -> None:
    answers = _concurrently(rest, "/write_async")
    accepted = [(output, r.json()) for output, r in answers if r.status_code == 200]
    assert len(accepted) == 1, [(r.status_code, r.text) for _, r in answers]
    (output, body), = accepted
    request_id = body["request_id"]
    assert body["output_file"] == output  # the answer describes its own request
    assert rest.http.get(f"/requests/{request_id}").json()["output_file"] == output
    for _, r in answers:
        if r.status_code != 200:
            assert r.status_code == 409, r.text
            assert r.json()["running_request_id"] == request_id
            assert f"Writer is busy with request {request_id}" in r.json()["detail"]
            assert output in r.json()["detail"] and "was not queued" in r.json()["detail"]
    assert [a.request_id for a in rest.backend.tracker.active()] == [request_id]
    rest.wait_state(request_id, "running")
    assert rest.http.post(f"/requests/{request_id}/stop").json()["state"] == "interrupted"
    # nothing was queued behind it: only its file exists, and the writer takes the next request
    assert [o for o, _ in answers if os.path.exists(o)] == [output]
    after = rest.http.post("/write_async", json={"n_images": 1, "output_file": rest.file("next.h5")})
    assert after.status_code == 200 and after.json()["output_file"] == rest.file("next.h5")
    rest.http.post(f"/requests/{after.json()['request_id']}/stop")


def test_concurrent_admin_write_async_each_answer_describes_its_own_request(rest: RestHarness) -> None:
    answers = _concurrently(rest, "/writer/write_async")
    started = [(output, r.json()) for output, r in answers if r.json()["status"] == "ok"]
    assert len(started) == 1, [r.text for _, r in answers]
    (output, body), = started
    assert body["message"] == "Writing started."
    assert body["writer"]["acquisition"]["info"]["output_file"] == output  # its own file, no other
    for _, r in answers:
        if r.json()["status"] != "ok":
            assert r.status_code == 200 and r.json()["status"] == "error"  # the admin interface's way
            assert "Writer is busy with request" in r.json()["message"] and output in r.json()["message"]
    stopped = rest.http.post("/writer/stop").json()
    assert stopped["status"] == "ok" and stopped["writer"]["state"] == "READY"


def test_a_busy_service_refuses_concurrent_requests_on_rabbitmq() -> None:
    tag = f"busy-{uuid.uuid4().hex[:10]}"
    release = threading.Event()
    served: list[str] = []

    def on_request(ctx: RequestContext) -> dict[str, Any]:
        served.append(ctx.request_id)
        release.wait(WAIT_S)
        return {"output_file": ctx.request["output_file"]}

    service_transport = make_transport(RABBITMQ_URL)
    client_transport = make_transport(RABBITMQ_URL)
    service = BrokerService(service_transport, "writer", tag, on_request, reject_when_busy=True)
    aggregator = StatusAggregator(client_transport, tag)
    try:
        service.start()
        aggregator.start()
        client = BrokerClient(client_transport, tag)
        start = threading.Barrier(N_CLIENTS)

        def submit(i: int) -> tuple[str, str]:
            start.wait()
            return client.request({"output_file": f"/data/{i}.h5"}), f"/data/{i}.h5"

        with ThreadPoolExecutor(N_CLIENTS) as pool:
            sent = list(pool.map(submit, range(N_CLIENTS)))

        def last(request_id: str) -> tuple[Action, Any]:
            def final_or_running() -> tuple[Action, Any] | None:
                try:
                    reports = aggregator.status(request_id)["services"].get("writer", [])
                except KeyError:
                    return None
                return reports[-1] if reports else None

            return wait_for(final_or_running, f"a status of {request_id}", WAIT_S)

        outcomes = {request_id: last(request_id) for request_id, _ in sent}
        running = [rid for rid, (action, _) in outcomes.items() if action is Action.START]
        assert len(running) == 1 and served == running, outcomes
        first = running[0]
        first_file = dict(sent)[first]
        for request_id, (action, message) in outcomes.items():
            if request_id != first:
                assert action is Action.FAIL
                assert message.startswith(f"busy: writer is running request {first} (writing {first_file})")
        release.set()
        done = aggregator.wait_for_complete(first, timeout=WAIT_S)
        assert done["services"]["writer"][-1] == (Action.SUCCESS, {"output_file": first_file})
        assert served == [first]  # none of the refused ones ran later
        again = client.request({"output_file": "/data/again.h5"})
        assert aggregator.wait_for_complete(again, timeout=WAIT_S)["status"] is Action.SUCCESS
        assert served == [first, again]
    finally:
        release.set()
        aggregator.stop()
        service.stop()
        service_transport.close()
        client_transport.close()


def test_a_request_no_service_ever_answers_does_not_block_the_writer(
    rest: RestHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request the broker took but no writer started (lost with a connection, swallowed) is marked
    failed once its deadline has long passed, so the next write is not refused as busy for ever."""
    rest.stop_writer()
    swallowed: list[str] = []
    cancel = rest.writer_transport.consume(REQUEST_EXCHANGE, rest.config.detector_name,
                                           lambda message: swallowed.append(message.correlation_id))
    try:
        lost = rest.http.post("/write_async", json={"n_images": 1, "output_file": rest.file("lost.h5")})
        assert lost.status_code == 200, lost.text
        lost_id = lost.json()["request_id"]
        wait_for(lambda: swallowed == [lost_id], "the request to vanish into the swallowing consumer", WAIT_S)
        busy = rest.http.post("/write_async", json={"n_images": 1, "output_file": rest.file("next.h5")})
        assert busy.status_code == 409 and busy.json()["running_request_id"] == lost_id
        monkeypatch.setattr(backend_module, "UNSTARTED_BOUND", 0.0)
        record = rest.http.get(f"/requests/{lost_id}").json()
        assert record["state"] == "failed"
        assert record["message"].startswith("no service started the request within 0 s")
    finally:
        cancel()
    assert rest.backend.tracker.active() == []
