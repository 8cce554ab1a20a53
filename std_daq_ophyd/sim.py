"""A whole std-daq for one simulated detector started from Python, for the devices' users and tests.

Re-exports :mod:`daq_backend.embedded`: :class:`LocalDaq` (the processes ``std-daq up`` runs, under
a supervisor in this process) and :class:`EmbeddedDaq` (the same roles as threads of this process),
with :func:`simulated_config` for a detector on free ports. The ophyd devices reach either only
through its REST URL, exactly as they would reach a DAQ server.
"""

from daq_backend.embedded import (
    EmbeddedDaq,
    LocalDaq,
    RestDetectorControl,
    free_tcp_port,
    free_udp_base,
    simulated_config,
)

__all__ = ["EmbeddedDaq", "LocalDaq", "RestDetectorControl", "free_tcp_port", "free_udp_base",
           "simulated_config"]
