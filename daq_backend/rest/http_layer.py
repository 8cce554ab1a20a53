"""How the REST API answers errors and refuses commands without a token.

:data:`STATUS_CODES` is the one table from a domain error (:mod:`daq_backend.rest.errors`) to its HTTP
status; :func:`install_error_handlers` answers every error with it in the shape of the route's family:

* v1 and own endpoints: the status with ``{"detail": <message>, <extra fields>}``;
* ``/detector``: the same, plus ``{"response": <message>}`` (the body v1 clients read);
* the admin interface (``/writer/*``, ``/daq/*``): HTTP 200 with ``{"status": "error", "message"}``,
  because ``std_daq_client`` only turns that into its ``StdDaqAdminException`` (any other status
  code becomes a bare ``RuntimeError``).

A request that fails FastAPI's own validation (a path or query parameter) is answered as
:class:`Invalid`; any other exception as 500 naming it. :func:`install_token_check` makes every
command (any method but GET, HEAD, OPTIONS) need ``Authorization: Bearer <token>`` (401 otherwise).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from daq_backend.auth import READ_METHODS, TOKEN_ENV
from daq_backend.rest.errors import (
    BadParameter,
    Conflict,
    DaqError,
    Forbidden,
    Invalid,
    Malformed,
    NotFound,
    Refused,
    TimedOut,
    TooLarge,
    Unavailable,
)

_logger = logging.getLogger(__name__)

ADMIN_PREFIXES = ("/writer/", "/daq/")
DETECTOR_PREFIX = "/detector"

#: the HTTP status of each domain error: the first class listed that the error is an instance of
#: (``Busy`` is a ``Conflict``; :class:`DaqError` itself comes last)
STATUS_CODES: dict[type[DaqError], int] = {
    Malformed: 400,
    BadParameter: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Invalid: 422,
    Refused: 502,
    Unavailable: 503,
    TimedOut: 504,
    DaqError: 500,
}


def status_code(error: DaqError) -> int:
    """The HTTP status ``error`` is answered with (:data:`STATUS_CODES`)."""
    for cls, code in STATUS_CODES.items():
        if isinstance(error, cls):
            return code
    return 500


def family(path: str) -> str:
    """Which answer shape a path's errors take: ``"admin"``, ``"detector"`` or ``"api"``."""
    if path.startswith(ADMIN_PREFIXES):
        return "admin"
    if path == DETECTOR_PREFIX or path.startswith(DETECTOR_PREFIX + "/"):
        return "detector"
    return "api"


def error_response(path: str, code: int, detail: str, **extra: Any) -> JSONResponse:
    """The error answer of ``path``'s family for an error of HTTP status ``code``."""
    if family(path) == "admin":
        return JSONResponse({"status": "error", "message": detail}, status_code=200)
    body: dict[str, Any] = {"detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    if family(path) == "detector":
        body["response"] = detail
    return JSONResponse(body, status_code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Answer domain errors, request-validation errors and unexpected exceptions (see module doc)."""

    @app.exception_handler(DaqError)
    async def _domain_error(request: Request, exc: DaqError) -> JSONResponse:
        return error_response(request.url.path, status_code(exc), exc.message, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        code = STATUS_CODES[Invalid]
        return error_response(request.url.path, code, detail or "invalid request", errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}")


def _unauthorized(path: str, detail: str) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if family(path) == "admin":
        body.update(status="error", message=detail)
    elif family(path) == "detector":
        body["response"] = detail
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def install_token_check(app: FastAPI, token: str) -> None:
    """Refuse (401, on every family, also the admin interface) a command without
    ``Authorization: Bearer <token>`` or with another token; reading endpoints stay open."""
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
