"""``/epics/write_async``: write buffered EPICS channels of a pulse-id range to a file (the EPICS
writer on its own broker tag); its progress is read like any request's, ``GET /requests/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from daq_backend.epics.writer import EpicsWriteRequest
from daq_backend.rest import models as m
from daq_backend.rest.backend import DaqBackend
from daq_backend.rest.routes.common import body_doc, error_docs, json_body


def epics_router(backend: DaqBackend) -> APIRouter:
    """The EPICS writer's route on ``backend``."""
    router = APIRouter()

    @router.post(
        "/epics/write_async",
        response_model=m.WriteAsyncResponse,
        tags=["requests"],
        summary="Write buffered EPICS channels of a pulse-id range to a file (the EPICS writer)",
        description="Follow it with GET /requests/{request_id}; its `result` names the datasets written.",
        openapi_extra=body_doc(
            EpicsWriteRequest,
            {"start_pulse_id": 100, "stop_pulse_id": 200, "channels": ["X:SIG"], "output_file": "/tmp/e.h5"},
        ),
        responses=error_docs(400, 403, 404, 422, 503),
    )
    async def epics_write_async(request: Request) -> m.WriteAsyncResponse:
        body = await json_body(request)
        return m.WriteAsyncResponse(request_id=await run_in_threadpool(backend.submit_epics, body))

    return router
