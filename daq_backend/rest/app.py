"""The REST API (FastAPI) of one DAQ: the std-daq v1 endpoints, what a client needs beyond them, the
admin interface and the dashboard.

Error answers (the table is ``daq_backend.rest.http_layer.STATUS_CODES``, documented in the OpenAPI
schema):

* v1 and own endpoints: HTTP 4xx/5xx with ``{"detail": <what is wrong>}``; ``/detector`` errors keep
  the v1 body ``{"response": <text>}`` (e.g. ``"Parameter not valid: FOO"``) and add ``detail``,
  with a real status code: 400 bad parameter, 404 unknown detector, 409 START while running / STOP
  while idle, 422 malformed request, 503 detector unreachable;
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

from fastapi import FastAPI

from daq_backend.rest.backend import DaqBackend
from daq_backend.rest.dashboard import dashboard_router
from daq_backend.rest.http_layer import install_error_handlers, install_token_check
from daq_backend.rest.routes import admin_router, epics_router, status_router, v1_router
from daq_backend.rest.routes.common import install_openapi


def create_app(backend: DaqBackend, token: str | None = None) -> FastAPI:
    """The API of one DAQ; the caller starts/closes ``backend`` (the app never owns it). ``token``:
    commands (every method but GET, HEAD, OPTIONS) need ``Authorization: Bearer <token>``."""
    app = FastAPI(
        title="std-daq REST API",
        version="1.0",
        description=(
            f"Detector DAQ of {backend.config.detector_name}: the std-daq seed's REST endpoints, request "
            "status/progress, health and statistics, and the std-daq admin interface (/writer, /daq).\n\n"
            + (__doc__ or "")
        ),
    )
    app.state.backend = backend
    if token is not None:
        install_token_check(app, token)
    install_error_handlers(app)
    app.include_router(v1_router(backend))
    app.include_router(status_router(backend, commands_need_token=token is not None))
    app.include_router(epics_router(backend))
    app.include_router(admin_router(backend))
    app.include_router(dashboard_router(app, backend))  # /ui: the live dashboard
    install_openapi(app)
    return app
