"""Where the images go and how the documents point at them: one write request per ``prepare``.

``prepare_unbounded`` asks the :class:`~ophyd_async.core.PathProvider` for the file name, opens one
open-ended write request for ``<directory>/<filename>.h5`` and returns ophyd-async's
:class:`~ophyd_async.core.StreamResourceDataProvider` over two datasets of the DAQ's file layout:

* ``<name>``: the images, ``/entry/data/data``, one ``(H, W)`` image per collection, chunked
  ``(1, H, W)``, dtype as the DAQ writes them (``<u2`` for 16-bit raw images);
* ``<name>-status``: each image's status, ``/entry/data/status`` (``|u1``: 0 good, 1 missing
  packets, 2 module id mismatch, 3 lost), so a consumer sees per image what it received.

The StreamDatum documents follow the writer's count of complete, flushed rows
(``writer.images_written``): an index is only referenced once its rows are in the file. The
geometry is read from the DAQ at every ``prepare`` (a changed bit depth changes the dtype).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from ophyd_async.core import (
    DetectorDataLogic,
    PathInfo,
    PathProvider,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
)

from daq_backend.writer.layout import DATA, STATUS
from std_daq_ophyd.async_devices.driver import StdDaqDriverIO
from std_daq_ophyd.async_devices.steps import OPEN_FILE, in_step
from std_daq_ophyd.async_devices.writer_io import StdDaqWriterIO

HDF5_MIMETYPE = "application/x-hdf5"
#: chunking of the per-image datasets in the DAQ's file layout
META_CHUNK = 4096
STATUS_SUFFIX = "-status"


def make_directories(info: PathInfo) -> None:
    """Create the folders below ``info.create_dir_depth`` on this host (ophyd-async's convention; the
    DAQ itself only writes into existing folders). Depth 0 creates nothing."""
    depth = info.create_dir_depth
    if depth == 0:
        return
    parts = info.directory_path.parts
    keep = len(parts) + depth if depth < 0 else depth + 1  # parts[0] is the root
    existing = Path(*parts[:max(keep, 1)])
    if not existing.is_dir():
        raise FileNotFoundError(f"{existing} does not exist: PathInfo.create_dir_depth={depth} only creates "
                                f"the folders below it")
    os.makedirs(info.directory_path, exist_ok=True)


class StdDaqDataLogic(DetectorDataLogic):
    """Opens the DAQ's file for each ``prepare`` and describes its images and per-image status."""

    def __init__(self, driver: StdDaqDriverIO, writer: StdDaqWriterIO, path_provider: PathProvider,
                 nxmx: Mapping[str, Any] | None = None) -> None:
        self.driver = driver
        self.writer = writer
        self.path_provider = path_provider
        #: the request's ``nxmx`` metadata: given, every file is an NXmx file
        self.nxmx = dict(nxmx) if nxmx else None

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        async with in_step(OPEN_FILE):
            config = await self.driver.refresh_config()
        info = self.path_provider(datakey_name)
        make_directories(info)
        file_name = f"{info.filename}.h5"
        path = PurePath(info.directory_path) / file_name
        settings = {k: await s.get_value() for k, s in (("exptime", self.driver.exposure_time),
                                                         ("period", self.driver.acquire_period),
                                                         ("timing", self.driver.timing_mode))}
        metadata: dict[str, Any] = {"ophyd_device": datakey_name, **settings}
        if self.nxmx:
            metadata["nxmx"] = self.nxmx
        await self.writer.open(path, metadata=metadata)
        h, w = config.image_shape
        images = StreamResourceInfo(
            data_key=datakey_name,
            shape=(h, w),
            chunk_shape=(1, h, w),
            dtype_numpy=np.dtype(config.image_dtype).str,
            parameters={"dataset": DATA},
        )
        status = StreamResourceInfo(
            data_key=f"{datakey_name}{STATUS_SUFFIX}",
            shape=(),
            chunk_shape=(META_CHUNK,),
            dtype_numpy=np.dtype(np.uint8).str,
            parameters={"dataset": STATUS},
        )
        return StreamResourceDataProvider(
            uri=f"{info.directory_uri}{file_name}",
            resources=[images, status],
            mimetype=HDF5_MIMETYPE,
            collections_written_signal=self.writer.images_written,
        )

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]

    async def stop(self) -> None:
        await self.writer.close()
