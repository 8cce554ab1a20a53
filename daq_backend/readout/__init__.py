"""Detector readout: UDP receivers -> frame rings -> synchroniser + assembler -> image ring.

Names are imported lazily so ``python -m daq_backend.readout.receiver`` does not import the module
twice (runpy warns when a package's ``__init__`` already imported the module it is asked to run).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModuleReceiver": "daq_backend.readout.receiver",
    "ReceiverStats": "daq_backend.readout.receiver",
    "ImageAssembler": "daq_backend.readout.assembler",
    "AssemblerStats": "daq_backend.readout.assembler",
    "Synchroniser": "daq_backend.readout.sync",
    "SyncedImage": "daq_backend.readout.sync",
    "Release": "daq_backend.readout.sync",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), name)
