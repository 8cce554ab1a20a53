"""Request status and stop, health, pipeline statistics, preview and config: what a client reads
beyond the v1 endpoints (``/requests/*``, ``/health``, ``/stats``, ``/preview``, ``/config``)."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from daq_backend.rest import models as m
from daq_backend.rest.backend import DaqBackend
from daq_backend.rest.errors import DaqError
from daq_backend.rest.routes.common import error_docs, request_status


def status_router(backend: DaqBackend, commands_need_token: bool) -> APIRouter:
    """The status routes of ``backend``; ``commands_need_token`` is reported by ``/health``."""
    router = APIRouter()
    name = backend.config.detector_name

    @router.get(
        "/requests/{request_id}",
        response_model=m.RequestStatus,
        tags=["requests"],
        summary="State and progress of a write request",
        responses=error_docs(404),
    )
    def get_request(request_id: str) -> m.RequestStatus:
        return request_status(backend.record(request_id))

    @router.post(
        "/requests/{request_id}/stop",
        response_model=m.RequestStatus,
        tags=["requests"],
        summary="Stop a write request; the file keeps the images written so far",
        description=(
            "With wait=true (default) answers once the request ended, or with 202 and its current "
            "state if it did not end within the kill timeout (a queued request is stopped when it starts). "
            "mode=kill (default) interrupts the request (state interrupted); mode=finish ends it as done "
            "with what it has (state completed, the file marked completed): the end of an open-ended "
            "acquisition, e.g. one file per scan."
        ),
        responses={
            202: {"model": m.RequestStatus, "description": "stop sent, not ended yet"},
            **error_docs(404, 503),
        },
    )
    async def stop_request(
        request_id: str,
        wait: bool = Query(True, description="wait for the request to end"),
        mode: Literal["kill", "finish"] = Query("kill", description="interrupt it, or finish it as done"),
    ) -> Any:
        record = await run_in_threadpool(backend.kill, request_id, mode == "finish")
        if wait and not record.final:
            try:
                record = await backend.wait_killed(request_id)
            except DaqError:
                record = backend.record(request_id)
        status_code = 200 if record.final else 202
        return JSONResponse(request_status(record).model_dump(mode="json"), status_code=status_code)

    @router.get(
        "/health",
        response_model=m.HealthResponse,
        tags=["service"],
        summary="Liveness of the API and whether it reaches its broker",
        responses={503: {"model": m.HealthResponse, "description": "the broker is unreachable"}},
    )
    def health() -> JSONResponse:
        broker = backend.broker_health()
        answer = m.HealthResponse(
            status="ok" if broker["broker"] == "up" else "unavailable",
            detector_name=name,
            uptime=time.monotonic() - backend.started_at,
            requests_active=len(backend.tracker.active()),
            pipeline=backend.stats()["pipeline"],
            commands_need_token=commands_need_token,
            **broker,
        )
        return JSONResponse(answer.model_dump(mode="json"), status_code=200 if answer.status == "ok" else 503)

    @router.get(
        "/stats",
        response_model=m.StatsResponse,
        tags=["service"],
        summary="Pipeline statistics: images/s and bytes/s of readout and writer, losses, per process",
    )
    def stats() -> dict[str, Any]:
        return backend.stats()

    @router.get(
        "/preview",
        response_class=Response,
        tags=["service"],
        summary="The latest image as a PNG",
        responses={200: {"content": {"image/png": {}}, "description": "PNG image"}, **error_docs(404)},
    )
    def preview() -> Response:
        return Response(backend.preview_png(), media_type="image/png")

    @router.get("/config", tags=["service"], summary="The detector configuration of this DAQ")
    def get_config() -> dict[str, Any]:
        return backend.config.to_json_dict()

    return router
