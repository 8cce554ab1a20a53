"""Bad requests are refused with the reason, never a 5xx; a request that passes validation never takes
the h5 writer down.

Once measured on ``std-daq up``: a 300-character file name answered 500, a 100,000-deep nested JSON
body 500, and ``n_images`` 2**64 was accepted, then the h5 writer crashed (``OverflowError``) and
``write_kill`` answered 504. Now each such request is refused by the REST API (413/422, the admin
interface's ``{"status": "error"}``) and by the writer agent when it comes straight from the broker
(``request_fail``), with a message that names the field and the limit; the limits are in the OpenAPI
schema. Requests at the limits are served: files complete or end as asked, every image accounted
for, the file, REST and the broker agreeing. Real processes (``std-daq up`` on RabbitMQ), a simulated
detector over UDP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests

from daq_backend.broker.protocol import Action
from daq_backend.messages import ImageAccounting
from daq_backend.testing import wait_for
from daq_backend.testing.up import Detector
from daq_backend.writer import layout
from tests.fault.up_fixtures import Up, running_up


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


DEEP_BODY = (b'{"output_file": "deep.h5", "n_images": 1, "metadata": {"a": ' + b"[" * 100_000 + b"]" * 100_000
             + b"}}")

#: name -> (body, REST status, text of the answer); the body is sent as JSON (bytes: as they are)
BAD: dict[str, tuple[Any, int, str]] = {
    "300-character file name": ({"output_file": "n" * 300 + ".h5", "n_images": 1}, 422,
                                "output_file: has a 303-byte name"),
    "100,000-deep JSON": (DEEP_BODY, 413, "request body nested too deeply"),
    "n_images 2**64": ({"output_file": "a.h5", "n_images": 2**64}, 422,
                       "n_images: Input should be less than or equal to 1000000000000"),
    "negative n_images": ({"output_file": "a.h5", "n_images": -5}, 422,
                          "n_images: Input should be greater than or equal to 1"),
    "n_images as a string": ({"output_file": "a.h5", "n_images": "10"}, 422,
                             "n_images: Input should be a valid integer"),
    "output_file a number": ({"output_file": 5, "n_images": 1}, 422,
                             "output_file: Input should be a valid string"),
    "5000-byte path": ({"output_file": "/d" * 2500, "n_images": 1}, 422, "4095"),
    "NUL in the path": ({"output_file": "a\u0000.h5", "n_images": 1}, 422, "output_file: contains a NUL"),
    "huge timeout": ({"output_file": "a.h5", "n_images": 1, "timeout": 1e300}, 422,
                     "timeout: Input should be less than or equal to 1000000"),
    "start_id 2**64": ({"output_file": "a.h5", "n_images": 1, "start_id": 2**64}, 422,
                       "start_id: Input should be less than or equal to 18446744073709551615"),
    "metadata 40 levels deep": ({"output_file": "a.h5", "n_images": 1, "metadata": {"a": nested(40)}}, 422,
                                "metadata: nested deeper than 32 levels"),
    "an ignored field 300 levels deep": ({"output_file": "a.h5", "n_images": 1, "sources": nested(300)}, 422,
                                         "sources: nested deeper than 32 levels"),
    "a 5 MiB body": ({"output_file": "a.h5", "n_images": 1, "metadata": {"a": "x" * (5 << 20)}}, 413,
                     "the limit is 4194304"),
    "a JSON list": ([1, 2], 422, "JSON object, got list"),
}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    base = tmp_path_factory.mktemp("badreq")
    (base / "data").mkdir()
    with running_up(base, "--output-root", str(base / "data")) as daq:
        daq.env["DATA"] = str(base / "data")
        yield daq


def data(up: Up) -> Path:
    return Path(up.env["DATA"])


def raw(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_refused_with_the_reason_on_every_interface(up: Up, case: str) -> None:
    body, status, text = BAD[case]
    for endpoint in ("/write_sync", "/write_async"):
        r = up.post(endpoint, data=raw(body))
        assert r.status_code == status, (endpoint, r.status_code, r.text[:500])
        assert text in r.json()["detail"], r.json()["detail"][:500]
    r = up.post("/writer/write_async", data=raw(body))  # the admin interface: 200 {"status": "error"}
    assert r.status_code == 200 and r.json()["status"] == "error", r.text[:500]
    assert text in r.json()["message"] or status == 413, r.json()["message"][:500]
    # straight on the broker, the writer agent refuses it itself
    if case in ("a 5 MiB body", "a JSON list"):
        return  # the REST API's limit / shape; the agent answers a list with "must be a JSON object"
    with up.broker() as (client, aggregator):
        action, message = up.broker_final(client, aggregator, raw(body))
    assert action is Action.FAIL, message
    expected = "nested too deeply" if case == "100,000-deep JSON" else text
    assert expected in message, message
    assert not [p for p in data(up).iterdir() if p.name.startswith(("a.h5", "deep", "n" * 10))]


def accounted(up: Up, request_id: str, path: Path, n_requested: int) -> tuple[dict[str, Any], dict[str, Any]]:
    final = up.rest_final(request_id)
    with h5py.File(path, "r") as h5:
        attrs = dict(h5.attrs)
        status = h5[layout.STATUS][:]
    accounting = ImageAccounting(
        n_requested=n_requested, n_written=int(attrs["n_written"]), n_good=int(np.sum(status == 0)),
        n_incomplete=final["n_incomplete_images"], n_lost=final["n_missing_images"],
        n_not_written=n_requested - int(attrs["n_written"]))
    assert accounting.balanced(), accounting
    assert final["n_written"] == attrs["n_written"] and final["state"] == attrs["status"], (final, attrs)
    return final, attrs


def test_requests_at_the_limits_are_served_and_the_writer_survives(up: Up) -> None:
    folder = data(up)
    with Detector(up.config, rate=50.0):
        # n_images at its maximum: written until killed; the kill is answered (the writer is alive)
        r = up.post("/write_async", {"output_file": "huge.h5", "n_images": 10**12})
        assert r.status_code == 200, r.text
        request_id = r.json()["request_id"]
        wait_for(lambda: up.request_status(request_id)["n_written"] >= 2, "the huge request writing", 120)
        kill = up.post("/write_kill", {"request_id": request_id})
        assert kill.status_code == 200, kill.text
        assert kill.json()["response"]["state"] == "interrupted"
        final, attrs = accounted(up, request_id, folder / "huge.h5", 10**12)
        assert attrs["n_images"] == 10**12 and attrs["status"] == "interrupted" and final["n_written"] >= 2

        # a 255-byte name, deep (32 levels) and large metadata, unicode: a complete file
        name = "é" * 125 + "ab.h5"
        metadata = {"deep": nested(31), "k" * 255: 2**70, "text": "ü" * 150_000, "ключ": [None, True, 1.5]}
        r = up.post("/write_sync", {"output_file": name, "n_images": 3, "metadata": metadata, "timeout": 60})
        assert r.status_code == 200, r.text
        final, attrs = accounted(up, r.json()["request_id"], folder / name, 3)
        assert attrs["status"] == "completed"
        with h5py.File(folder / name, "r") as h5:
            entry = h5["/entry"].attrs
            assert json.loads(entry["deep"]) == nested(31) and entry["text"] == "ü" * 150_000
            assert json.loads(entry["k" * 255]) == 2**70 and json.loads(entry["ключ"]) == [None, True, 1.5]

        # the last possible start_id: no such image comes; its timeout ends it
        r = up.post("/write_sync", {"output_file": "last.h5", "n_images": 1, "start_id": 2**64 - 1,
                                    "timeout": 1})
        assert r.status_code == 200, r.text
        final, attrs = accounted(up, r.json()["request_id"], folder / "last.h5", 1)
        assert final["state"] == "interrupted" and "no image arrived for 1 s" in final["message"]

        # and the same at the limits straight on the broker
        with up.broker() as (client, aggregator):
            action, message = up.broker_final(client, aggregator, {"output_file": "b" * 252 + ".h5",
                                                                   "n_images": 2})
        assert action is Action.SUCCESS and message["n_written"] == 2, message
    services = up.services()
    assert all(s["alive"] and s["restarts"] == 0 for s in services.values()), services
    assert requests.get(f"{up.url}/health", timeout=30).json()["requests_active"] == 0
    assert not [p for p in folder.iterdir() if p.name.endswith(".creating")]
