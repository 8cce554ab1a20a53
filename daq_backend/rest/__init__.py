"""REST API of the DAQ: the seed's endpoints, request status, health, statistics, admin interface."""

from daq_backend.rest.app import create_app
from daq_backend.rest.backend import ApiError, ConfigStore, DaqBackend, RequestRecord, RequestTracker
from daq_backend.rest.server import RestOptions, RestServer, RestService, rest_main

__all__ = [
    "ApiError",
    "ConfigStore",
    "DaqBackend",
    "RequestRecord",
    "RequestTracker",
    "RestOptions",
    "RestServer",
    "RestService",
    "create_app",
    "rest_main",
]
