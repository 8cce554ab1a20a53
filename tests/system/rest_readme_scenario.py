"""Runs every REST example of the seed README verbatim against ``python -m daq_backend.rest.server``.

Meant to run inside private mount, network and pid namespaces (see ``test_rest_server.py``): there
``127.0.0.1:5000`` and ``/tmp/test.h5`` — the README's own address and file — belong to this run
alone. Prints one JSON object per example: ``{"example", "status", "body"}``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from daq_backend.broker import EmbeddedTransport
from daq_backend.config import parse_config
from daq_backend.testing import EIGER_HALF_POSITIONS, wait_for
from daq_backend.testing.writer import FakeAssembler
from daq_backend.writer.agent import DetectorWriter

BASE = "http://127.0.0.1:5000"
CONFIG = {
    "detector_name": "cSAXS.EG01V01",
    "detector_type": "eiger",
    "n_modules": 2,
    "bit_depth": 16,
    "image_pixel_height": 514,
    "image_pixel_width": 514,
    "start_udp_port": 50000,
    "module_positions": EIGER_HALF_POSITIONS,
}


def report(example: str, status: int, body: Any) -> None:
    print(json.dumps({"example": example, "status": status, "body": body}), flush=True)


def finished(request_id: str) -> None:
    """Wait for an async request to end, then free /tmp/test.h5 for the next example."""
    final = ("completed", "interrupted", "failed")
    wait_for(lambda: requests.get(f"{BASE}/requests/{request_id}").json()["state"] in final, "request end",
             120.0, interval=0.05, ignore=(requests.ConnectionError,))
    Path("/tmp/test.h5").unlink(missing_ok=True)


def curl(command: str) -> tuple[int, Any]:
    out = subprocess.run(
        f'{command} -s -w "\\n%{{http_code}}"', shell=True, capture_output=True, text=True, check=True
    )
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body)


def examples() -> None:
    # /write_sync (POST), python
    data = {"sources": "eiger", "n_images": 10, "output_file": "/tmp/test.h5"}
    headers = {"Content-type": "application/json"}
    r = requests.post(url="http://127.0.0.1:5000/write_sync", json=data, headers=headers)
    report("write_sync python", r.status_code, r.json())
    Path("/tmp/test.h5").unlink(missing_ok=True)

    # /write_sync (POST), curl
    code, body = curl(
        """curl -X POST http://127.0.0.1:5000/write_sync -H "Content-Type: application/json" -d '{"n_images":5,"output_file":"/tmp/test.h5", "sources":"eiger"}'"""  # noqa: E501
    )
    report("write_sync curl", code, body)
    Path("/tmp/test.h5").unlink(missing_ok=True)

    # /write_async (POST), python
    data = {"sources": "eiger", "n_images": 10, "output_file": "/tmp/test.h5"}
    headers = {"Content-type": "application/json"}
    r = requests.post(url="http://127.0.0.1:5000/write_async", json=data, headers=headers)
    report("write_async python", r.status_code, r.json())
    finished(r.json()["request_id"])

    # /write_async (POST), curl
    code, body = curl(
        """curl -X POST http://127.0.0.1:5000/write_async -H "Content-Type: application/json" -d '{"n_images":5,"output_file":"/tmp/test.h5", "sources":"eiger"}'"""  # noqa: E501
    )
    report("write_async curl", code, body)
    finished(body["request_id"])

    # /write_kill (POST)
    # triggers an async acquisition
    data = {"sources": "eiger", "n_images": 10, "output_file": "/tmp/test.h5"}
    headers = {"Content-type": "application/json"}
    r = requests.post(url="http://127.0.0.1:5000/write_async", json=data, headers=headers)
    time.sleep(3)
    # stores the request_id from the write_async post and kills it
    req_id = str(r.json()["request_id"])
    data = {"request_id": req_id}
    headers = {"Content-type": "application/json"}
    r = requests.post(url="http://127.0.0.1:5000/write_kill", json=data, headers=headers)
    report("write_kill python", r.status_code, r.json())
    Path("/tmp/test.h5").unlink(missing_ok=True)

    # Eiger configuration set (POST)
    data = {"det_name": "eiger", "config": {"frames": 5, "dr": 32}}
    headers = {"Content-type": "application/json"}
    r = requests.post(url="http://127.0.0.1:5000/detector", json=data, headers=headers)
    report("detector set", r.status_code, r.json())

    # NOTE: an unknown parameter
    data = {"det_name": "eiger", "config": {"frames": 5, "FOO": 1}}
    r = requests.post(url="http://127.0.0.1:5000/detector", json=data, headers=headers)
    report("detector set unknown", r.status_code, r.json())

    # Eiger configuration get (GET)
    r = requests.get(url="http://127.0.0.1:5000/detector/eiger")
    report("detector get", r.status_code, r.json())


def main() -> int:
    config_path = Path("/tmp/eiger.json")
    config_path.write_text(json.dumps(CONFIG))
    config = parse_config(CONFIG)
    # the seed's examples write /tmp/test.h5: /tmp must be an output root of the API and the writer
    rest = subprocess.Popen([sys.executable, "-m", "daq_backend.cli", "rest", str(config_path),
                             "--output-root", "/tmp"])
    assembler = writer = transport = None
    try:
        wait_for(lambda: requests.get(f"{BASE}/health").ok, "the REST API (and its embedded broker hub)",
                 120.0, interval=0.05, ignore=(requests.ConnectionError,))
        transport = EmbeddedTransport("default")
        writer = DetectorWriter(config, transport, output_roots=[Path("/tmp")]).start()
        assembler = FakeAssembler(config).start(rate_hz=2.0)  # 10 images take 5 s: the kill lands mid-file
        examples()
    finally:
        if assembler is not None:
            assembler.close()
        if writer is not None:
            writer.stop()
        if transport is not None:
            transport.close()
        rest.send_signal(signal.SIGTERM)
        code = rest.wait(60)
    report("rest exit", code, None)
    return 0


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[2])
    sys.exit(main())
