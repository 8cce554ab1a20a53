"""The REST API (FastAPI): the seed's endpoints, what a client needs beyond them, and the admin interface.

Error answers (decided here, documented in the OpenAPI schema):

* seed and own endpoints: HTTP 4xx/5xx with ``{"detail": <what is wrong>}``; ``/detector`` errors keep
  the seed's body ``{"response": <text>}`` (e.g. ``"Parameter not valid: FOO"``) and add ``detail``,
  but with a real status code instead of the seed's 200: 400 bad parameter, 404 unknown detector,
  409 START while running / STOP while idle, 422 malformed request, 503 detector unreachable;
* malformed JSON: 400; a body over 4 MiB or nested too deeply for the parser: 413; a valid JSON body
  with a wrong, missing or out-of-range field: 422; a file outside the output roots: 403; a write
  while another write request is queued or running: 409 naming that one (one write at a time, never
  queued); no writer agent on the broker tag, or the broker unreachable: 503 within
  ``BROKER_ANSWER_BOUND`` seconds;
* the admin interface (``/writer/*``, ``/daq/*``) answers HTTP 200 with ``{"status": "error",
  "message"}`` like REST v2, because ``std_daq_client`` only turns that into its
  ``StdDaqAdminException`` (any other status code becomes a bare ``RuntimeError``);
* with a token configured, a command (any method but GET, HEAD, OPTIONS) without
  ``Authorization: Bearer <token>``, or with another token, is answered 401 on every family (also the
  admin interface): reading endpoints stay open.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from daq_backend.auth import READ_METHODS, TOKEN_ENV
from daq_backend.epics.writer import EpicsWriteRequest
from daq_backend.messages import RequestState
from daq_backend.rest import models as m
from daq_backend.rest.backend import (
    ApiError,
    DaqBackend,
    RequestRecord,
    acquisition_log,
    check_output_root,
    explain_validation,
)
from daq_backend.rest.dashboard import dashboard_router
from daq_backend.writer.request import MAX_METADATA_DEPTH, WriteRequest

_logger = logging.getLogger(__name__)

ADMIN_PREFIXES = ("/writer/", "/daq/")
DETECTOR_PREFIX = "/detector"
MAX_LOGS = 10_000
#: bytes of a request body (a write request's metadata may have 1 MiB as JSON)
MAX_BODY_BYTES = 4 << 20

#: request-body models referenced from ``openapi_extra`` (bodies are parsed by hand for clear errors)
_BODY_MODELS: list[type[BaseModel]] = [
    WriteRequest,
    m.KillRequest,
    m.DetectorRequest,
    m.AdminWriteRequest,
    EpicsWriteRequest,
]


def _body(model: type[BaseModel], example: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    if example is not None:
        content["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": content}}}


def _errors(*codes: int, model: type[BaseModel] = m.ErrorBody) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "malformed JSON or a bad detector parameter",
        403: "output file outside the output roots (the answer names them and --output-root)",
        404: "unknown request id or detector",
        409: "the detector or writer is in the wrong state for this (e.g. a write while another runs)",
        413: f"request body over {MAX_BODY_BYTES} bytes or nested too deeply",
        422: "a field is missing, of the wrong type or out of range",
        502: "the detector refused the command",
        503: "detector unreachable, broker unreachable or no writer agent on the tag",
        504: "no answer in time; the request itself goes on",
    }
    return {code: {"model": model, "description": reasons[code]} for code in codes}


def _family(path: str) -> str:
    if path.startswith(ADMIN_PREFIXES):
        return "admin"
    if path == DETECTOR_PREFIX or path.startswith(DETECTOR_PREFIX + "/"):
        return "detector"
    return "api"


def _error_response(path: str, status_code: int, detail: str, **extra: Any) -> JSONResponse:
    family = _family(path)
    if family == "admin":
        return JSONResponse({"status": "error", "message": detail}, status_code=200)
    body: dict[str, Any] = {"detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    if family == "detector":
        body["response"] = detail
    return JSONResponse(body, status_code=status_code)


async def _json_body(request: Request) -> Any:
    """The parsed JSON body: 413 above :data:`MAX_BODY_BYTES` or nested deeper than the parser takes,
    400 when it is no JSON."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {len(raw)} bytes: the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise ApiError(400, "empty request body: expected a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise ApiError(413, "request body nested too deeply (write request metadata may nest at most "
                            f"{MAX_METADATA_DEPTH} levels)") from None


def _write_result(record: RequestRecord) -> m.WriteResult:
    return m.WriteResult(
        output_file=record.output_file,
        status=record.final_action or record.state.value,
        init_timestamp=record.init_timestamp,
        end_timestamp=record.end_timestamp,
        state=record.state,
        n_images=record.n_images,
        n_written=record.n_written,
        message=record.message,
    )


def _request_status(record: RequestRecord) -> m.RequestStatus:
    return m.RequestStatus(
        request_id=record.request_id,
        state=record.state,
        n_written=record.n_written,
        n_images=record.n_images,
        n_missing_images=record.n_missing_images,
        n_incomplete_images=record.n_incomplete_images,
        output_file=record.output_file,
        message=record.message,
        warning=record.warning,
        init_timestamp=record.init_timestamp,
        end_timestamp=record.end_timestamp,
        created=record.created,
        request=record.request,
        services=record.services,
        kind=record.kind,
        result=record.result if record.state is RequestState.COMPLETED else None,
    )


def _unauthorized(path: str, detail: str) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    family = _family(path)
    if family == "admin":
        body.update(status="error", message=detail)
    elif family == "detector":
        body["response"] = detail
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def create_app(backend: DaqBackend, token: str | None = None) -> FastAPI:
    """The API of one DAQ; the caller starts/closes ``backend`` (the app never owns it). ``token``:
    commands (every method but GET, HEAD, OPTIONS) need ``Authorization: Bearer <token>``."""
    name = backend.config.detector_name
    app = FastAPI(
        title="std-daq REST API",
        version="1.0",
        description=(
            f"Detector DAQ of {name}: the std-daq seed's REST endpoints, request status/progress, "
            "health and statistics, and the std-daq admin interface (/writer, /daq).\n\n" + (__doc__ or "")
        ),
    )
    app.state.backend = backend

    # -- who may send commands -----------------------------------------------------------------
    if token is not None:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def _require_token(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            if request.method in READ_METHODS:
                return await call_next(request)
            given = request.headers.get("authorization")
            if given is not None and hmac.compare_digest(given.encode(), expected):
                return await call_next(request)
            if given is None:
                detail = (f"{request.method} {request.url.path} is a command and this DAQ takes commands "
                          "only with its token: send the header 'Authorization: Bearer <token>' (the token "
                          f"of the DAQ's --token-file or {TOKEN_ENV}; clients: token=... or {TOKEN_ENV})")
            else:
                detail = (f"{request.method} {request.url.path} refused: the token sent is not this DAQ's "
                          "(expected 'Authorization: Bearer <token>' with the token of the DAQ's "
                          f"--token-file or {TOKEN_ENV})")
            _logger.warning("refused %s %s from %s: %s", request.method, request.url.path,
                            request.client.host if request.client else "?",
                            "no token" if given is None else "wrong token")
            return _unauthorized(request.url.path, detail)

    # -- errors --------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(request.url.path, exc.status_code, exc.detail, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return _error_response(request.url.path, 422, detail or "invalid request", errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}")

    # -- seed REST v1: writing -----------------------------------------------------------------
    write_example = {"sources": "eiger", "n_images": 10, "output_file": "/tmp/test.h5"}

    @app.post(
        "/write_sync",
        response_model=m.WriteSyncResponse,
        tags=["seed"],
        summary="Write n_images into output_file and answer when the file is closed",
        description=(
            "Waits as long as the acquisition needs. With `timeout` (seconds without a new image, "
            "enforced by the writer) the call also gives up after that long without any status: 504, "
            "and the request goes on (poll /requests/{id})."
        ),
        openapi_extra=_body(WriteRequest, write_example),
        responses=_errors(400, 403, 404, 409, 413, 422, 503, 504),
    )
    async def write_sync(request: Request) -> m.WriteSyncResponse:
        write = await run_in_threadpool(backend.validate_write, await _json_body(request))
        request_id = await run_in_threadpool(backend.submit_write, write)
        record = await backend.wait_final(request_id, write.timeout)
        return m.WriteSyncResponse(request_id=request_id, response=_write_result(record))

    @app.post(
        "/write_async",
        response_model=m.WriteAsyncResponse,
        tags=["seed"],
        summary="Start writing and answer with the request id at once",
        openapi_extra=_body(WriteRequest, write_example),
        responses=_errors(400, 403, 409, 413, 422, 503),
    )
    async def write_async(request: Request) -> m.WriteAsyncResponse:
        write = await run_in_threadpool(backend.validate_write, await _json_body(request))
        request_id = await run_in_threadpool(backend.submit_write, write)
        return m.WriteAsyncResponse(request_id=request_id, output_file=write.output_file)

    @app.post(
        "/write_kill",
        response_model=m.WriteSyncResponse,
        tags=["seed"],
        summary="Stop a write request and answer when it ended (like write_sync)",
        openapi_extra=_body(m.KillRequest, {"request_id": "5b50509f-e441-4f9a-8031-de10eceab9d6"}),
        responses=_errors(400, 404, 422, 503, 504),
    )
    async def write_kill(request: Request) -> m.WriteSyncResponse:
        kill = _validate(m.KillRequest, await _json_body(request))
        await run_in_threadpool(backend.kill, kill.request_id)
        record = await backend.wait_killed(kill.request_id)
        return m.WriteSyncResponse(request_id=kill.request_id, response=_write_result(record))

    # -- seed REST v1: detector ----------------------------------------------------------------
    detector_errors = _errors(400, 404, 409, 422, 502, 503, model=m.DetectorErrorBody)

    @app.get(
        "/detector/{det_name}",
        response_model=m.DetectorConfigResponse,
        tags=["seed"],
        summary="Detector settings: triggers, timing, frames, period, exptime, dr, speed, tengiga, threshold",
        responses=_errors(404, 502, 503, model=m.DetectorErrorBody),
    )
    def get_detector(det_name: str) -> dict[str, Any]:
        return backend.detector_config(det_name)

    @app.post(
        "/detector/{det_name}",
        response_model=m.DetectorResponse,
        response_model_exclude_none=True,
        tags=["seed"],
        summary="Change detector settings ('config') and/or run a command ('cmd': START, STOP, STATUS)",
        openapi_extra=_body(m.DetectorRequest, {"config": {"frames": 5, "period": 0.01, "exptime": 0.001}}),
        responses=detector_errors,
    )
    async def post_detector_named(det_name: str, request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        return await run_in_threadpool(backend.detector_request, det_name, body)

    @app.post(
        "/detector",
        response_model=m.DetectorResponse,
        response_model_exclude_none=True,
        tags=["seed"],
        summary="As POST /detector/{det_name}, with the detector named in the body ('det_name')",
        openapi_extra=_body(m.DetectorRequest, {"det_name": "eiger", "config": {"frames": 5, "dr": 32}}),
        responses=detector_errors,
    )
    async def post_detector(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        return await run_in_threadpool(backend.detector_request, None, body)

    # -- beyond the seed -----------------------------------------------------------------------
    @app.get(
        "/requests/{request_id}",
        response_model=m.RequestStatus,
        tags=["requests"],
        summary="State and progress of a write request",
        responses=_errors(404),
    )
    def get_request(request_id: str) -> m.RequestStatus:
        return _request_status(backend.record(request_id))

    @app.post(
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
            **_errors(404, 503),
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
            except ApiError:
                record = backend.record(request_id)
        status_code = 200 if record.final else 202
        return JSONResponse(_request_status(record).model_dump(mode="json"), status_code=status_code)

    @app.post(
        "/epics/write_async",
        response_model=m.WriteAsyncResponse,
        tags=["requests"],
        summary="Write buffered EPICS channels of a pulse-id range to a file (the EPICS writer)",
        description="Follow it with GET /requests/{request_id}; its `result` names the datasets written.",
        openapi_extra=_body(
            EpicsWriteRequest,
            {"start_pulse_id": 100, "stop_pulse_id": 200, "channels": ["X:SIG"], "output_file": "/tmp/e.h5"},
        ),
        responses=_errors(400, 403, 404, 422, 503),
    )
    async def epics_write_async(request: Request) -> m.WriteAsyncResponse:
        body = await _json_body(request)
        return m.WriteAsyncResponse(request_id=await run_in_threadpool(backend.submit_epics, body))

    @app.get(
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
            commands_need_token=token is not None,
            **broker,
        )
        return JSONResponse(answer.model_dump(mode="json"), status_code=200 if answer.status == "ok" else 503)

    @app.get(
        "/stats",
        response_model=m.StatsResponse,
        tags=["service"],
        summary="Pipeline statistics: images/s and bytes/s of readout and writer, losses, per process",
    )
    def stats() -> dict[str, Any]:
        return backend.stats()

    @app.get(
        "/preview",
        response_class=Response,
        tags=["service"],
        summary="The latest image as a PNG",
        responses={200: {"content": {"image/png": {}}, "description": "PNG image"}, **_errors(404)},
    )
    def preview() -> Response:
        return Response(backend.preview_png(), media_type="image/png")

    @app.get("/config", tags=["service"], summary="The detector configuration of this DAQ")
    def get_config() -> dict[str, Any]:
        return backend.config.to_json_dict()

    # -- admin interface (REST v2) -------------------------------------------------------------
    def admin_writer(message: str, request_id: str | None = None) -> m.AdminWriterResponse:
        return m.AdminWriterResponse(
            status=m.ApiStatus.OK, message=message,
            writer=m.WriterStatus.model_validate(backend.writer_status(request_id)),
        )

    async def admin_submit(request: Request) -> tuple[str, WriteRequest]:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(422, f"request body must be a JSON object, got {type(body).__name__}")
        check_output_root(body.get("output_file"), backend.output_roots)
        context = {"output_roots": backend.output_roots, "check_filesystem": backend.check_filesystem}
        try:
            admin = await run_in_threadpool(m.AdminWriteRequest.model_validate, body, context=context)
        except ValidationError as exc:
            raise ApiError(422, f"invalid write request: {explain_validation(exc)}") from None
        write = WriteRequest.model_validate(
            admin.model_dump(exclude={"run_id"}, exclude_unset=True), context={"check_filesystem": False}
        )
        run_id = admin.run_id if admin.run_id is not None else time.time_ns()
        return await run_in_threadpool(backend.submit_write, write, run_id=run_id), write

    admin_write_doc = _body(m.AdminWriteRequest, {"n_images": 100, "output_file": "/tmp/test.h5"})

    @app.post(
        "/writer/write_sync",
        response_model=m.AdminWriterResponse,
        tags=["admin"],
        summary="Write and answer with the writer status once the acquisition ended",
        openapi_extra=admin_write_doc,
    )
    async def admin_write_sync(request: Request) -> m.AdminWriterResponse:
        request_id, write = await admin_submit(request)
        record = await backend.wait_final(request_id, write.timeout)
        return admin_writer(
            "Writing finished." if record.state is RequestState.COMPLETED else "Writing ended.", request_id
        )

    @app.post(
        "/writer/write_async",
        response_model=m.AdminWriterResponse,
        tags=["admin"],
        summary="Start writing and answer with the writer status at once",
        openapi_extra=admin_write_doc,
    )
    async def admin_write_async(request: Request) -> m.AdminWriterResponse:
        request_id, _ = await admin_submit(request)
        return admin_writer("Writing started.", request_id)

    @app.get("/writer/status", response_model=m.AdminWriterResponse, tags=["admin"], summary="Writer status")
    def admin_status() -> m.AdminWriterResponse:
        status = backend.writer_status()
        return m.AdminWriterResponse(
            status=m.ApiStatus.OK, message=f"Writer is {status['state']}",
            writer=m.WriterStatus.model_validate(status),
        )

    @app.post(
        "/writer/stop",
        response_model=m.AdminWriterResponse,
        tags=["admin"],
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

    @app.get("/daq/config", response_model=m.AdminConfigResponse, tags=["admin"], summary="DAQ configuration")
    def admin_get_config() -> m.AdminConfigResponse:
        return admin_config(f"DAQ configured for bit_depth={backend.config.bit_depth}.")

    @app.post(
        "/daq/config",
        response_model=m.AdminConfigResponse,
        tags=["admin"],
        summary="Change some fields of the DAQ configuration (fields not given keep their values)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}, "example": {"bit_depth": 32}}},
            }
        },
    )
    async def admin_set_config(request: Request) -> m.AdminConfigResponse:
        changes = await _json_body(request)
        await run_in_threadpool(backend.update_config, changes)
        return admin_config(
            f"DAQ configured for bit_depth={backend.config.bit_depth}. {backend.config_store.last_message}"
        )

    @app.get(
        "/daq/stats", response_model=m.AdminStatsResponse, tags=["admin"], summary="Image and byte rates"
    )
    def admin_stats() -> m.AdminStatsResponse:
        summary = backend.stats()
        stats = m.AdminStats(detector=summary["detector"], writer=summary["writer"])
        return m.AdminStatsResponse(status=m.ApiStatus.OK, message=f"DAQ statistics for {name}.", stats=stats)

    @app.get(
        "/daq/logs/{n_logs}",
        response_model=m.AdminLogsResponse,
        tags=["admin"],
        summary="The last n finished acquisitions, newest first",
    )
    def admin_logs(n_logs: int = Path(ge=0, le=MAX_LOGS)) -> m.AdminLogsResponse:
        logs = [m.AcquisitionLog.model_validate(acquisition_log(r)) for r in backend.tracker.logs(n_logs)]
        return m.AdminLogsResponse(status=m.ApiStatus.OK, message=f"DAQ logs for {name}.", logs=logs)

    @app.get(
        "/daq/deployment",
        response_model=m.AdminDeploymentResponse,
        tags=["admin"],
        summary="Status of the last configuration change",
    )
    def admin_deployment() -> m.AdminDeploymentResponse:
        return m.AdminDeploymentResponse(
            status=m.ApiStatus.OK,
            message=f"Deployment status for {name}.",
            deployment=m.DeploymentStatus.model_validate(backend.config_store.deployment()),
        )

    app.include_router(dashboard_router(app, backend))  # /ui: the live dashboard

    # -- OpenAPI: add the hand-parsed request bodies' schemas ------------------------------------
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _BODY_MODELS:
                body_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body_schema.pop("$defs", {}))
                components[model.__name__] = body_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _validate(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, explain_validation(exc)) from None
