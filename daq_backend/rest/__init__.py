"""REST API of the DAQ: the v1 endpoints, request status, health, statistics, admin interface.

Domain modules (no HTTP): ``request_tracker``, ``config_store``, ``stats_summary``, ``errors`` and the
facade ``backend.DaqBackend``; the HTTP layer: ``app.create_app``, ``routes`` (one router per family),
``http_layer`` (error table and handlers, token check), ``dashboard``."""

from daq_backend.rest.app import create_app
from daq_backend.rest.backend import DaqBackend
from daq_backend.rest.config_store import ConfigStore
from daq_backend.rest.errors import DaqError
from daq_backend.rest.request_tracker import RequestRecord, RequestTracker
from daq_backend.rest.server import RestOptions, RestServer, RestService, rest_main

__all__ = [
    "ConfigStore",
    "DaqBackend",
    "DaqError",
    "RequestRecord",
    "RequestTracker",
    "RestOptions",
    "RestServer",
    "RestService",
    "create_app",
    "rest_main",
]
