"""std-daq beamline profile, step 2: RunEngine, best-effort callback, document store."""

import os

from bluesky import RunEngine
from bluesky.callbacks.best_effort import BestEffortCallback

RE = RunEngine({})
bec = BestEffortCallback()
if not os.environ.get("DISPLAY"):
    bec.disable_plots()  # no screen: tables only
RE.subscribe(bec)
docs = beamline.store  # noqa: F821  (from 00-beamline.py) every run's documents: docs.last, docs.files()
RE.subscribe(docs)
if beamline.tiled_writer is not None:  # noqa: F821
    RE.subscribe(beamline.tiled_writer)  # noqa: F821
    tiled = beamline.tiled  # noqa: F821  tiled[uid]["primary"]["det_image"].read()
