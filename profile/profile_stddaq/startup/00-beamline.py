"""std-daq beamline profile, step 1: devices from the beamline YAML (see ../beamline.yaml).

Start with ``ipython --profile-dir=profile/profile_stddaq`` (add ``-c "RE(count([det], 3))"`` to run
one plan and exit). If no DAQ answers at ``daq.url`` and ``daq.embedded_fallback`` is true, a simulated
DAQ (readout, writer, REST API, UDP detector simulator) is started inside this IPython; it stops when
IPython exits.
"""

import atexit
import logging
import os
from pathlib import Path

from IPython import get_ipython

from std_daq_ophyd.beamline import CONFIG_ENV, load_beamline

logging.basicConfig(level=os.environ.get("STD_DAQ_LOG_LEVEL", "WARNING"))
_config = os.environ.get(CONFIG_ENV) or str(Path(get_ipython().profile_dir.location) / "beamline.yaml")
beamline = load_beamline(_config)
atexit.register(beamline.close)
globals().update(beamline.devices)
print(f"std-daq: DAQ at {beamline.url}; devices: {', '.join(beamline.devices)}")
