"""Ophyd devices for std-daq: detector, writer and EPICS buffer, driven over the DAQ's REST API."""

from std_daq_ophyd.acquisition import LostImagesError, LostImagesWarning, ProgressStatus, Timeouts
from std_daq_ophyd.client import StdDaqClient, StdDaqError, StdDaqUnreachable
from std_daq_ophyd.control import SettingsError
from std_daq_ophyd.detector import StdDaqDetector
from std_daq_ophyd.epics_buffer import EpicsBuffer, EpicsBufferSupplement, epics_buffer_wrapper
from std_daq_ophyd.plans import fly, summarize
from std_daq_ophyd.writer import StdDaqWriter

__all__ = [
    "EpicsBuffer",
    "EpicsBufferSupplement",
    "LostImagesError",
    "LostImagesWarning",
    "ProgressStatus",
    "SettingsError",
    "StdDaqClient",
    "StdDaqDetector",
    "StdDaqError",
    "StdDaqUnreachable",
    "StdDaqWriter",
    "Timeouts",
    "epics_buffer_wrapper",
    "fly",
    "summarize",
]
