"""What the route families share: reading a JSON body, validating it, documenting it, the answers
built from a :class:`RequestRecord`.

Request bodies are parsed by hand (:func:`json_body`, :func:`validate_body`) so that every error names
what is wrong; :func:`body_doc` and :func:`error_docs` put the bodies and the error answers into the
OpenAPI schema, and :func:`install_openapi` adds the hand-parsed bodies' models to its components.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError

from daq_backend.epics.writer import EpicsWriteRequest
from daq_backend.messages import RequestState
from daq_backend.rest import models as m
from daq_backend.rest.errors import Invalid, Malformed, TooLarge
from daq_backend.rest.request_tracker import RequestRecord
from daq_backend.validation import explain as explain_validation
from daq_backend.writer.request import MAX_METADATA_DEPTH, WriteRequest

#: bytes of a request body (a write request's metadata may have 1 MiB as JSON)
MAX_BODY_BYTES = 4 << 20

#: request-body models referenced from ``openapi_extra`` (bodies are parsed by hand for clear errors)
BODY_MODELS: list[type[BaseModel]] = [
    WriteRequest,
    m.KillRequest,
    m.DetectorRequest,
    m.AdminWriteRequest,
    EpicsWriteRequest,
]


def body_doc(model: type[BaseModel], example: dict[str, Any] | None = None) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body is ``model`` (parsed by hand)."""
    content: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    if example is not None:
        content["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": content}}}


def error_docs(*codes: int, model: type[BaseModel] = m.ErrorBody) -> dict[int | str, dict[str, Any]]:
    """``responses`` of a route that may answer the HTTP error ``codes`` (with a ``model`` body)."""
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


def install_openapi(app: FastAPI) -> None:
    """Make ``app``'s OpenAPI schema carry the hand-parsed request bodies' models (:data:`BODY_MODELS`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_MODELS:
                body_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body_schema.pop("$defs", {}))
                components[model.__name__] = body_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def json_body(request: Request) -> Any:
    """The parsed JSON body: :class:`TooLarge` above :data:`MAX_BODY_BYTES`
    or nested deeper than the parser takes, :class:`Malformed` when it is no JSON."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise TooLarge(f"request body of {len(raw)} bytes: the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise Malformed("empty request body: expected a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise TooLarge("request body nested too deeply (write request metadata may nest at most "
                       f"{MAX_METADATA_DEPTH} levels)") from None


def validate_body(model: type[BaseModel], body: Any) -> Any:
    """``body`` validated as ``model``; :class:`Invalid` naming each wrong field."""
    if not isinstance(body, dict):
        raise Invalid(f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise Invalid(explain_validation(exc)) from None


def write_result(record: RequestRecord) -> m.WriteResult:
    """The ``response`` of a ``write_sync`` / ``write_kill`` answer."""
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


def request_status(record: RequestRecord) -> m.RequestStatus:
    """A record as ``GET /requests/{request_id}`` answers it."""
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
