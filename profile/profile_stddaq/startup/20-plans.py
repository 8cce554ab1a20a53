"""std-daq beamline profile, step 3: plans."""

import bluesky.plan_stubs as bps  # noqa: F401
import bluesky.preprocessors as bpp  # noqa: F401
from bluesky.plans import count, grid_scan, list_scan, rel_scan, scan  # noqa: F401

from std_daq_ophyd.epics_buffer import EpicsBufferSupplement, epics_buffer_wrapper  # noqa: F401
from std_daq_ophyd.plans import fly, summarize  # noqa: F401

print("plans: count, scan, rel_scan, grid_scan, list_scan, fly(det); summarize(docs.last) after a run")
