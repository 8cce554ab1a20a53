"""The REST API's routes by family, each an ``APIRouter`` built on one :class:`DaqBackend`:
:func:`v1_router` (write and detector endpoints), :func:`status_router` (requests, health, stats,
preview, config), :func:`epics_router` (EPICS writer), :func:`admin_router` (admin interface); the
dashboard's is ``daq_backend.rest.dashboard.dashboard_router``."""

from daq_backend.rest.routes.admin import admin_router
from daq_backend.rest.routes.epics import epics_router
from daq_backend.rest.routes.status import status_router
from daq_backend.rest.routes.v1 import v1_router

__all__ = ["admin_router", "epics_router", "status_router", "v1_router"]
