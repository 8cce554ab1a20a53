"""The std-daq admin interface (REST v2): ``/writer/*`` (write, status, stop) and ``/daq/*`` (config,
stats, logs, deployment).

Every answer is ``{"status": "ok" | "error", "message", ...}``; errors too are answered with HTTP 200
(see :mod:`daq_backend.rest.http_layer`), as ``std_daq_client`` expects.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from daq_backend.messages import RequestState
from daq_backend.rest import models as m
from daq_backend.rest.backend import DaqBackend, check_output_root
from daq_backend.rest.errors import Invalid
from daq_backend.rest.request_tracker import acquisition_log
from daq_backend.rest.routes.common import body_doc, json_body
from daq_backend.validation import explain as explain_validation
from daq_backend.writer.request import WriteRequest

#: the most acquisitions ``/daq/logs/{n_logs}`` returns
MAX_LOGS = 10_000


def admin_router(backend: DaqBackend) -> APIRouter:
    """The admin interface of ``backend``."""
    router = APIRouter(tags=["admin"])
    name = backend.config.detector_name

    def admin_writer(message: str, request_id: str | None = None) -> m.AdminWriterResponse:
        return m.AdminWriterResponse(
            status=m.ApiStatus.OK, message=message,
            writer=m.WriterStatus.model_validate(backend.writer_status(request_id)),
        )

    async def admin_submit(request: Request) -> tuple[str, WriteRequest]:
        body = await json_body(request)
        if not isinstance(body, dict):
            raise Invalid(f"request body must be a JSON object, got {type(body).__name__}")
        check_output_root(body.get("output_file"), backend.output_roots)
        context = {"output_roots": backend.output_roots, "check_filesystem": backend.check_filesystem}
        try:
            admin = await run_in_threadpool(m.AdminWriteRequest.model_validate, body, context=context)
        except ValidationError as exc:
            raise Invalid(f"invalid write request: {explain_validation(exc)}") from None
        write = WriteRequest.model_validate(
            admin.model_dump(exclude={"run_id"}, exclude_unset=True), context={"check_filesystem": False}
        )
        run_id = admin.run_id if admin.run_id is not None else time.time_ns()
        return await run_in_threadpool(backend.submit_write, write, run_id=run_id), write

    admin_write_doc = body_doc(m.AdminWriteRequest, {"n_images": 100, "output_file": "/tmp/test.h5"})

    @router.post(
        "/writer/write_sync",
        response_model=m.AdminWriterResponse,
        summary="Write and answer with the writer status once the acquisition ended",
        openapi_extra=admin_write_doc,
    )
    async def admin_write_sync(request: Request) -> m.AdminWriterResponse:
        request_id, write = await admin_submit(request)
        record = await backend.wait_final(request_id, write.timeout)
        return admin_writer(
            "Writing finished." if record.state is RequestState.COMPLETED else "Writing ended.", request_id
        )

    @router.post(
        "/writer/write_async",
        response_model=m.AdminWriterResponse,
        summary="Start writing and answer with the writer status at once",
        openapi_extra=admin_write_doc,
    )
    async def admin_write_async(request: Request) -> m.AdminWriterResponse:
        request_id, _ = await admin_submit(request)
        return admin_writer("Writing started.", request_id)

    @router.get("/writer/status", response_model=m.AdminWriterResponse, summary="Writer status")
    def admin_status() -> m.AdminWriterResponse:
        status = backend.writer_status()
        return m.AdminWriterResponse(
            status=m.ApiStatus.OK, message=f"Writer is {status['state']}",
            writer=m.WriterStatus.model_validate(status),
        )

    @router.post(
        "/writer/stop",
        response_model=m.AdminWriterResponse,
        summary="Stop writing (also resets a writer that stopped answering)",
    )
    async def admin_stop() -> m.AdminWriterResponse:
        stopped = await run_in_threadpool(backend.stop_all)
        await backend.settle_stopped(stopped)
        return admin_writer("Writing stopped." if stopped else "Nothing to stop.")

    def admin_config(message: str) -> m.AdminConfigResponse:
        config = backend.config
        return m.AdminConfigResponse(
            status=m.ApiStatus.OK,
            message=message,
            config=config.to_json_dict(),
            config_id=backend.config_store.config_id,
        )

    @router.get("/daq/config", response_model=m.AdminConfigResponse, summary="DAQ configuration")
    def admin_get_config() -> m.AdminConfigResponse:
        return admin_config(f"DAQ configured for bit_depth={backend.config.bit_depth}.")

    @router.post(
        "/daq/config",
        response_model=m.AdminConfigResponse,
        summary="Change some fields of the DAQ configuration (fields not given keep their values)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}, "example": {"bit_depth": 32}}},
            }
        },
    )
    async def admin_set_config(request: Request) -> m.AdminConfigResponse:
        changes = await json_body(request)
        await run_in_threadpool(backend.update_config, changes)
        return admin_config(
            f"DAQ configured for bit_depth={backend.config.bit_depth}. {backend.config_store.last_message}"
        )

    @router.get("/daq/stats", response_model=m.AdminStatsResponse, summary="Image and byte rates")
    def admin_stats() -> m.AdminStatsResponse:
        summary = backend.stats()
        stats = m.AdminStats(detector=summary["detector"], writer=summary["writer"])
        return m.AdminStatsResponse(status=m.ApiStatus.OK, message=f"DAQ statistics for {name}.", stats=stats)

    @router.get(
        "/daq/logs/{n_logs}",
        response_model=m.AdminLogsResponse,
        summary="The last n finished acquisitions, newest first",
    )
    def admin_logs(n_logs: int = Path(ge=0, le=MAX_LOGS)) -> m.AdminLogsResponse:
        logs = [m.AcquisitionLog.model_validate(acquisition_log(r)) for r in backend.tracker.logs(n_logs)]
        return m.AdminLogsResponse(status=m.ApiStatus.OK, message=f"DAQ logs for {name}.", logs=logs)

    @router.get(
        "/daq/deployment",
        response_model=m.AdminDeploymentResponse,
        summary="Status of the last configuration change",
    )
    def admin_deployment() -> m.AdminDeploymentResponse:
        return m.AdminDeploymentResponse(
            status=m.ApiStatus.OK,
            message=f"Deployment status for {name}.",
            deployment=m.DeploymentStatus.model_validate(backend.config_store.deployment()),
        )

    return router
