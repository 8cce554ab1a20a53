"""Detector writer: the writer agent (broker requests -> StoreStream) and the h5 writer (StoreStream +
image ring -> HDF5 files in the layout of ``writer.layout``)."""

from daq_backend.writer.agent import (
    DetectorWriter,
    WriteInterrupted,
    WriterAgent,
    WriterFailed,
    writer_agent_main,
)
from daq_backend.writer.client import listen_main, write_main
from daq_backend.writer.h5_writer import H5Writer, h5_writer_main
from daq_backend.writer.layout import ImageFile, open_image_file, recover_file, written_rows
from daq_backend.writer.request import RequestError, WriteRequest, parse_write_request

__all__ = [
    "DetectorWriter",
    "H5Writer",
    "ImageFile",
    "RequestError",
    "WriteInterrupted",
    "WriteRequest",
    "WriterAgent",
    "WriterFailed",
    "h5_writer_main",
    "listen_main",
    "open_image_file",
    "parse_write_request",
    "recover_file",
    "write_main",
    "writer_agent_main",
    "written_rows",
]
