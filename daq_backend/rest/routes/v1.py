"""The std-daq REST v1 endpoints: ``/write_sync``, ``/write_async``, ``/write_kill`` and ``/detector``.

Errors are answered with a real HTTP status and ``{"detail"}``; ``/detector`` errors also carry
``{"response": <text>}`` (e.g. ``"Parameter not valid: FOO"``), the body v1 clients read.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from daq_backend.rest import models as m
from daq_backend.rest.backend import DaqBackend
from daq_backend.rest.routes.common import body_doc, error_docs, json_body, validate_body, write_result
from daq_backend.writer.request import WriteRequest

WRITE_EXAMPLE = {"sources": "eiger", "n_images": 10, "output_file": "/tmp/test.h5"}


def v1_router(backend: DaqBackend) -> APIRouter:
    """Writing (sync, async, kill) and the detector's settings and commands, on ``backend``."""
    router = APIRouter(tags=["seed"])

    @router.post(
        "/write_sync",
        response_model=m.WriteSyncResponse,
        summary="Write n_images into output_file and answer when the file is closed",
        description=(
            "Waits as long as the acquisition needs. With `timeout` (seconds without a new image, "
            "enforced by the writer) the call also gives up after that long without any status: 504, "
            "and the request goes on (poll /requests/{id})."
        ),
        openapi_extra=body_doc(WriteRequest, WRITE_EXAMPLE),
        responses=error_docs(400, 403, 404, 409, 413, 422, 503, 504),
    )
    async def write_sync(request: Request) -> m.WriteSyncResponse:
        write = await run_in_threadpool(backend.validate_write, await json_body(request))
        request_id = await run_in_threadpool(backend.submit_write, write)
        record = await backend.wait_final(request_id, write.timeout)
        return m.WriteSyncResponse(request_id=request_id, response=write_result(record))

    @router.post(
        "/write_async",
        response_model=m.WriteAsyncResponse,
        summary="Start writing and answer with the request id at once",
        openapi_extra=body_doc(WriteRequest, WRITE_EXAMPLE),
        responses=error_docs(400, 403, 409, 413, 422, 503),
    )
    async def write_async(request: Request) -> m.WriteAsyncResponse:
        write = await run_in_threadpool(backend.validate_write, await json_body(request))
        request_id = await run_in_threadpool(backend.submit_write, write)
        return m.WriteAsyncResponse(request_id=request_id, output_file=write.output_file)

    @router.post(
        "/write_kill",
        response_model=m.WriteSyncResponse,
        summary="Stop a write request and answer when it ended (like write_sync)",
        openapi_extra=body_doc(m.KillRequest, {"request_id": "5b50509f-e441-4f9a-8031-de10eceab9d6"}),
        responses=error_docs(400, 404, 422, 503, 504),
    )
    async def write_kill(request: Request) -> m.WriteSyncResponse:
        kill = validate_body(m.KillRequest, await json_body(request))
        await run_in_threadpool(backend.kill, kill.request_id)
        record = await backend.wait_killed(kill.request_id)
        return m.WriteSyncResponse(request_id=kill.request_id, response=write_result(record))

    detector_errors = error_docs(400, 404, 409, 422, 502, 503, model=m.DetectorErrorBody)

    @router.get(
        "/detector/{det_name}",
        response_model=m.DetectorConfigResponse,
        summary="Detector settings: triggers, timing, frames, period, exptime, dr, speed, tengiga, threshold",
        responses=error_docs(404, 502, 503, model=m.DetectorErrorBody),
    )
    def get_detector(det_name: str) -> dict[str, Any]:
        return backend.detector_config(det_name)

    @router.post(
        "/detector/{det_name}",
        response_model=m.DetectorResponse,
        response_model_exclude_none=True,
        summary="Change detector settings ('config') and/or run a command ('cmd': START, STOP, STATUS)",
        openapi_extra=body_doc(
            m.DetectorRequest, {"config": {"frames": 5, "period": 0.01, "exptime": 0.001}}
        ),
        responses=detector_errors,
    )
    async def post_detector_named(det_name: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        return await run_in_threadpool(backend.detector_request, det_name, body)

    @router.post(
        "/detector",
        response_model=m.DetectorResponse,
        response_model_exclude_none=True,
        summary="As POST /detector/{det_name}, with the detector named in the body ('det_name')",
        openapi_extra=body_doc(m.DetectorRequest, {"det_name": "eiger", "config": {"frames": 5, "dr": 32}}),
        responses=detector_errors,
    )
    async def post_detector(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        return await run_in_threadpool(backend.detector_request, None, body)

    return router
