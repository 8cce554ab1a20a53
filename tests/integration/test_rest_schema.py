"""Schemathesis against the API's own OpenAPI schema: generated requests (valid and invalid) to every
operation find no server error, and every answer matches the documented status codes and schemas.

The DAQ behind it is real (embedded broker, writer agent + h5 writer, simulated detector) with a
stand-in assembler producing small images; the only output root does not exist, so a generated
output file is outside it (403) or, relative, in a missing folder (422): no generated write request
blocks. Bounded: a fixed number of examples per operation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from schemathesis.core.failures import FailureGroup, ServerError

from daq_backend.config import DetectorConfig
from daq_backend.testing import make_config
from daq_backend.testing.rest import RestHarness

MAX_EXAMPLES = 50


def small_detector() -> DetectorConfig:
    """A GigaFRoST of 128x480 pixels: 120 kB images keep the stand-in assembler cheap."""
    return make_config("gigafrost", n_modules=8, image_pixel_height=128, image_pixel_width=480)


@pytest.fixture(scope="module")
def daq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestHarness]:
    ipc_dir = tempfile.mkdtemp(prefix="sdq", dir="/tmp")
    previous = os.environ.get("STD_DAQ_IPC_DIR")
    os.environ["STD_DAQ_IPC_DIR"] = ipc_dir
    harness = None
    try:
        base = tmp_path_factory.mktemp("schema")
        harness = RestHarness(base, small_detector(), output_roots=[base / "no-such-root"])
        assert harness.assembler is not None
        harness.assembler.start(rate_hz=20)
        yield harness
    finally:
        if harness is not None:
            harness.close()
        if previous is None:
            os.environ.pop("STD_DAQ_IPC_DIR", None)
        else:
            os.environ["STD_DAQ_IPC_DIR"] = previous
        shutil.rmtree(ipc_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def operations(daq: RestHarness) -> dict[str, schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(f"{daq.url}/openapi.json")
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[operation.label] = operation
    return found


# every operation of the schema (checked against the live schema below, so none is forgotten)
LABELS = [
    "POST /write_sync", "POST /write_async", "POST /write_kill", "GET /detector/{det_name}",
    "POST /detector/{det_name}", "POST /detector", "GET /requests/{request_id}",
    "POST /requests/{request_id}/stop", "GET /health", "GET /stats", "GET /preview", "GET /config",
    "POST /writer/write_sync", "POST /writer/write_async", "GET /writer/status", "POST /writer/stop",
    "GET /daq/config", "POST /daq/config", "GET /daq/stats", "GET /daq/logs/{n_logs}", "GET /daq/deployment",
    "POST /epics/write_async", "GET /ui", "GET /ui/snapshot",
]  # fmt: skip


def test_every_operation_is_fuzzed(operations: dict[str, schemathesis.APIOperation]) -> None:
    assert sorted(operations) == sorted(LABELS)


#: operations with something to get wrong (a body or a typed parameter): also fed invalid data
NEGATABLE = [
    "POST /write_sync", "POST /write_async", "POST /write_kill", "POST /detector/{det_name}",
    "POST /detector", "POST /writer/write_sync", "POST /writer/write_async", "POST /daq/config",
    "GET /daq/logs/{n_logs}", "POST /epics/write_async",
]  # fmt: skip
CASES = [(label, GenerationMode.POSITIVE) for label in LABELS] + [
    (label, GenerationMode.NEGATIVE) for label in NEGATABLE
]


def fuzz(operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def run(case: schemathesis.Case) -> None:
        # Semantic checks (roots, files, detector state) reject schema-valid data with 4xx by design,
        # and the admin interface answers errors with 200 + {"status": "error"} (REST v2's contract).
        case.call_and_validate(excluded_checks=[negative_data_rejection, positive_data_acceptance])

    run()


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES])
def test_generated_requests_find_no_server_error(
    daq: RestHarness, operations: dict[str, schemathesis.APIOperation], label: str, mode: GenerationMode
) -> None:
    fuzz(operations[label], mode)


def test_the_fuzzer_does_report_a_server_error(
    daq: RestHarness, operations: dict[str, schemathesis.APIOperation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run above can fail: a handler that raises is caught (500 is not a documented answer)."""

    def broken() -> dict[str, object]:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(daq.backend, "stats", broken)
    with pytest.raises(FailureGroup) as caught:
        fuzz(operations["GET /stats"], GenerationMode.POSITIVE)
    assert any(isinstance(e, ServerError) for e in caught.value.exceptions)


def test_the_run_left_the_daq_healthy(daq: RestHarness) -> None:
    health = daq.http.get("/health").json()
    assert health["status"] == "ok"
    assert daq.http.get("/writer/status").json()["status"] == "ok"
