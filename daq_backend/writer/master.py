"""The master file of a write request whose images are split over several part files.

With ``n_writers`` N, writer *k* of N writes the request's rows *k*, *k* + N, *k* + 2N, ... (row =
image id − the request's first image id) into its own part file, an ordinary file of
:mod:`daq_backend.writer.layout`. The master file, at the requested ``output_file``, presents the
request as one file: ``/entry/data/data``, ``image_id``, ``status`` and ``n_missing_packets`` are
HDF5 virtual datasets (VDS) over the parts, in image order.

Why rows modulo N rather than blocks of k images: every writer starts at once and stays busy at any
request length (a block split leaves writers idle for short requests and needs the length up front),
and one mapping per part describes the whole request, however long: the VDS maps each part with an
*unlimited* strided hyperslab (start *k*, stride N, count unlimited), so the master is written once,
when the request starts, and never rewritten; open-ended requests (the ophyd device's) need nothing
else. Readers see the extent the parts have reached (``H5D_VDS_LAST_AVAILABLE``); rows a part has not
reached yet read as the fill values (pixels 0, ``status`` 255 = not written).

A part's region may be less than the full image (a detector read out by several hosts: each host's
part holds its modules' rows/columns): the mapping then places it at its ``(y, x)`` offset.

A detector read out by several hosts (``readout_hosts``): each host's parts are mapped to its
region; ``/entry/data/parts/<host>/image_id``, ``status`` and ``n_missing_packets`` are VDS over
that host's parts (its own per-image accounting). A VDS cannot combine sources, so while the parts
are written ``/entry/data/status``, ``n_missing_packets`` and ``image_id`` map the first host's
parts; when the request ends :func:`combine_hosts` replaces them with ordinary datasets: per image
the worst status of the hosts (``ID_MISMATCH`` where the hosts wrote different image ids in one
row), the sum of their missing packets.

The part files are named by relative paths in the master (next to it), so a copy of the output folder
moved elsewhere still reads. Reading while the parts are written: open the master with ``swmr=True``
and call ``dataset.refresh()`` to see rows the parts flushed since; count only the first
:func:`leading_rows` rows as complete (each part's ``n_written`` counter says what it flushed).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5p, h5s, h5t

from daq_backend.formats import ImageStatus
from daq_backend.messages import FAULT_BOUND
from daq_backend.writer import layout

#: the per-image datasets the master presents, with the parts' dtypes and fill values
PER_IMAGE = (layout.IMAGE_ID, layout.STATUS, layout.N_MISSING_PACKETS)
FILL: dict[str, int] = {layout.IMAGE_ID: 0, layout.STATUS: layout.STATUS_NOT_WRITTEN,
                        layout.N_MISSING_PACKETS: 0}
DTYPES: dict[str, np.dtype[Any]] = {layout.IMAGE_ID: np.dtype("<u8"), layout.STATUS: np.dtype("u1"),
                                    layout.N_MISSING_PACKETS: np.dtype("<u4")}
MASTER_KIND = "std-daq master"


@dataclass(frozen=True)
class Part:
    """One part file: written by writer ``writer`` of ``n_writers``, covering ``region`` (``y, x, h,
    w`` in the full image; None: the whole image). ``file`` is relative to the master's folder."""

    file: str
    writer: int
    n_writers: int
    region: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.writer < self.n_writers:
            raise ValueError(f"writer {self.writer} of {self.n_writers}: expected 0 <= writer < n_writers")
        if Path(self.file).is_absolute() or ".." in Path(self.file).parts:
            raise ValueError(f"part file {self.file!r}: expected a name relative to the master's folder")


def part_file_name(output_file: str | Path, writer: int, host: str | None = None) -> str:
    """The part file of ``writer`` (on ``host``) for a master at ``output_file``: a name beside it
    (``run1.h5`` → ``run1_part0.h5``, ``run1_daq-a_part0.h5``), so the folder moves as one."""
    path = Path(output_file)
    where = f"_{host}" if host else ""
    return f"{path.stem}{where}_part{writer}{path.suffix or '.h5'}"


def _map(dcpl: h5p.PropDCID, part: Part, dataset: str, image_shape: tuple[int, ...]) -> None:
    """Map ``part``'s ``dataset`` onto the master's rows ``writer::n_writers`` (and its region)."""
    unlimited = h5s.UNLIMITED
    if image_shape:
        full_h, full_w = image_shape
        y, x, h, w = part.region or (0, 0, full_h, full_w)
        virtual = h5s.create_simple((0, full_h, full_w), (unlimited, full_h, full_w))
        virtual.select_hyperslab((part.writer, y, x), (unlimited, 1, 1), stride=(part.n_writers, 1, 1),
                                 block=(1, h, w))
        source = h5s.create_simple((0, h, w), (unlimited, h, w))
        source.select_hyperslab((0, 0, 0), (unlimited, 1, 1), block=(1, h, w))
    else:
        virtual = h5s.create_simple((0,), (unlimited,))
        virtual.select_hyperslab((part.writer,), (unlimited,), stride=(part.n_writers,), block=(1,))
        source = h5s.create_simple((0,), (unlimited,))
        source.select_hyperslab((0,), (unlimited,), block=(1,))
    dcpl.set_virtual(virtual, part.file.encode(), dataset.encode(), source)


def _virtual_dataset(h5: h5py.File, path: str, parts: Sequence[Part], dtype: str | np.dtype[Any],
                     image_shape: tuple[int, ...], fill: int, source: str | None = None) -> None:
    """A VDS at ``path`` over the parts' dataset ``source`` (default: the same path)."""
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_fill_value(np.array(fill, dtype=dtype))
    for part in parts:
        _map(dcpl, part, source or path, image_shape)
    space = h5s.create_simple((0, *image_shape), (h5s.UNLIMITED, *image_shape))
    group = h5.require_group(str(Path(path).parent))
    h5d.create(group.id, Path(path).name.encode(), h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)


def create_master(path: str | Path, parts: Sequence[Part], *, image_shape: tuple[int, int],
                  image_dtype: str | np.dtype[Any], n_images: int, request_id: str = "",
                  status_parts: Sequence[Part] | None = None, overwrite: bool = False,
                  dir_fd: int | None = None, host_parts: Mapping[str, Sequence[Part]] | None = None) -> Path:
    """Write the master file at ``path`` (built under a hidden name, then renamed, as the parts are).

    ``parts``: every part file, with the writer and region it covers; the per-image datasets map
    ``status_parts`` (default: the parts covering the image's origin, one per writer: with several
    hosts, each host's parts keep their own per-image status, see :func:`part_status`). The parts
    need not exist yet. ``n_images``: the request's length (0: open-ended). ``dir_fd``: a descriptor
    of the master's folder (the writer agent passes the one it opened inside its output root with
    ``roots.open_folder``): the master is built and named in that folder, never through a symlink;
    ``overwrite`` replaces only a file this DAQ wrote (``layout.replace_problem``). ``host_parts``:
    each readout host's parts (a detector split over hosts): ``/entry/data/parts/<host>/...`` present
    each host's per-image datasets and the ``hosts`` attribute lists them in order."""
    path = Path(path)
    if not parts:
        raise ValueError("a master file needs at least one part")
    writers = {p.n_writers for p in parts}
    if len(writers) != 1:
        raise ValueError(f"parts disagree about the number of writers: {sorted(writers)}")
    full_h, full_w = image_shape
    for part in parts:
        y, x, h, w = part.region or (0, 0, full_h, full_w)
        if y < 0 or x < 0 or h < 1 or w < 1 or y + h > full_h or x + w > full_w:
            raise ValueError(f"part {part.file}: region {part.region} outside the image {tuple(image_shape)}")
    own_fd = None
    if dir_fd is None:
        dir_fd = own_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _create_master(path, parts, dir_fd, image_shape=image_shape, image_dtype=image_dtype,
                              n_images=n_images, request_id=request_id, status_parts=status_parts,
                              overwrite=overwrite, n_writers=next(iter(writers)),
                              host_parts=host_parts or {})
    finally:
        if own_fd is not None:
            os.close(own_fd)


def _create_master(path: Path, parts: Sequence[Part], dir_fd: int, *, image_shape: tuple[int, int],
                   image_dtype: str | np.dtype[Any], n_images: int, request_id: str,
                   status_parts: Sequence[Part] | None, overwrite: bool, n_writers: int,
                   host_parts: Mapping[str, Sequence[Part]]) -> Path:
    problem = layout.replace_problem(path.name, dir_fd, overwrite)
    if problem:
        raise layout.FileCreateError(f"cannot create {path}: {problem}")
    heads = list(status_parts) if status_parts is not None else [
        p for p in parts if p.region is None or p.region[:2] == (0, 0)]
    if sorted(p.writer for p in heads) != list(range(n_writers)):
        raise ValueError("the per-image datasets need exactly one part per writer")
    building = f".{path.name}.{uuid.uuid4().hex[:8]}.creating"
    try:
        with h5py.File(layout.fd_path(dir_fd, building), "w-", libver="latest") as h5:
            h5.attrs.update({
                "default": "entry", "creator": "std-daq-bluesky daq_backend.writer", "kind": MASTER_KIND,
                "file_name": path.name, "status": layout.FILE_WRITING, "n_written": np.uint64(0),
                "n_images": np.uint64(n_images), "request_id": request_id, "n_writers": n_writers,
                "parts": [p.file for p in parts], "end_reason": "", "hosts": list(host_parts),
            })
            entry = h5.create_group(layout.ENTRY)
            entry.attrs.update({"NX_class": "NXentry", "default": "data"})
            group = h5.create_group(layout.DATA_GROUP)
            group.attrs.update({"NX_class": "NXdata", "signal": "data"})
            _virtual_dataset(h5, layout.DATA, parts, image_dtype, tuple(image_shape), 0)
            for dataset in PER_IMAGE:
                _virtual_dataset(h5, dataset, heads, DTYPES[dataset], (), FILL[dataset])
                for host, mine in host_parts.items():
                    _virtual_dataset(h5, host_dataset(host, dataset), mine, DTYPES[dataset], (),
                                     FILL[dataset], source=dataset)
            # the detector description (NeXus fields, config) is the first part's
            h5[layout.INSTRUMENT] = h5py.ExternalLink(parts[0].file, layout.INSTRUMENT)
        layout.publish_at(building, path, dir_fd, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(building, dir_fd=dir_fd)
    return path


def host_dataset(host: str, dataset: str) -> str:
    """Where the master presents ``host``'s own per-image ``dataset`` (e.g. ``layout.STATUS`` ->
    ``/entry/data/parts/<host>/status``)."""
    return f"{layout.DATA_GROUP}/parts/{host}/{Path(dataset).name}"


def master_hosts(h5: h5py.File) -> list[str]:
    """The readout hosts of a master (empty: one host)."""
    return [h.decode() if isinstance(h, bytes) else str(h) for h in h5.attrs.get("hosts", [])]


def combine_hosts(master: str | Path) -> int:
    """Replace the master's per-image datasets by the hosts' combination (a detector split over
    hosts, at the end of the request): ``status`` the worst of the hosts' (the highest code;
    ``ID_MISMATCH`` where their ``image_id`` differ), ``n_missing_packets`` their sum, ``image_id``
    the first host's. Rows are the longest host's extent (a row a host did not reach has its fill:
    status 255 = not written). Returns the rows combined (0: a master of one host, left as it is)."""
    # read-only: the VDS sources (the parts) are opened with the master's access mode
    with h5py.File(master, "r", swmr=True) as h5:
        hosts = master_hosts(h5)
        if not hosts:
            return 0
        per_host = {name: {d: h5[host_dataset(name, d)][:] for d in PER_IMAGE} for name in hosts}
    n = max(len(v[layout.STATUS]) for v in per_host.values())

    def padded(values: np.ndarray, dataset: str) -> np.ndarray:
        out = np.full(n, FILL[dataset], dtype=DTYPES[dataset])
        out[:len(values)] = values
        return out

    status = np.zeros(n, dtype=DTYPES[layout.STATUS])
    missing = np.zeros(n, dtype=DTYPES[layout.N_MISSING_PACKETS])
    first_ids = padded(per_host[hosts[0]][layout.IMAGE_ID], layout.IMAGE_ID)
    for values in per_host.values():
        status = np.maximum(status, padded(values[layout.STATUS], layout.STATUS))
        missing += padded(values[layout.N_MISSING_PACKETS], layout.N_MISSING_PACKETS)
        ids = padded(values[layout.IMAGE_ID], layout.IMAGE_ID)
        status[(ids != first_ids) & (status < layout.STATUS_LOST)] = int(ImageStatus.ID_MISMATCH)
    with _open_for_update(master) as h5:
        for dataset, combined in ((layout.STATUS, status), (layout.N_MISSING_PACKETS, missing),
                                  (layout.IMAGE_ID, first_ids)):
            del h5[dataset]
            h5.create_dataset(dataset, data=combined, maxshape=(None,), chunks=True,
                              fillvalue=FILL[dataset])
        h5.attrs["combined"] = True
    return n


#: seconds an update of the master waits for readers that hold it open (HDF5's file lock): a
#: reader following the request (SWMR, ``refresh()``) closes it soon after the last rows; half the
#: fault bound, so a request still ends within ``FAULT_BOUND``
UPDATE_LOCK_WAIT = 0.5 * FAULT_BOUND


def _open_for_update(path: str | Path) -> h5py.File:
    """Open the master ``r+``. A reader that has it open (a client following the parts, which opens
    the master for a moment to find them) holds HDF5's file lock: retried for ``UPDATE_LOCK_WAIT`` s."""
    deadline = time.monotonic() + UPDATE_LOCK_WAIT
    while True:
        try:
            return h5py.File(path, "r+")
        except OSError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def leading_rows(part_rows: Sequence[int]) -> int:
    """Complete leading rows of the master, given each writer's flushed rows (``part_rows[k]``:
    writer *k* of ``len(part_rows)``): row *r* is complete when writer ``r % N`` has flushed more
    than ``r // N`` rows, so the leading complete rows end at the first writer that lags."""
    n = len(part_rows)
    return min(rows * n + k for k, rows in enumerate(part_rows)) if n else 0


def part_rows(master: str | Path) -> list[int]:
    """Each writer's flushed rows, read from its part (0 for a part that does not exist yet)."""
    master = Path(master)
    with h5py.File(master, "r") as h5:
        n_writers = int(h5.attrs["n_writers"])
        files = [str(f) for f in h5.attrs["parts"]]
    rows = [0] * n_writers
    seen: dict[int, int] = {}
    for name in files:
        writer = _writer_of(name)
        part = master.parent / name
        if not part.exists():
            seen[writer] = 0
            continue
        with layout.open_image_file(part) as h5:
            count = layout.written_rows(h5)
        seen[writer] = min(seen.get(writer, count), count)  # several hosts: the lowest of them
    for writer, count in seen.items():
        rows[writer] = count
    return rows


def _writer_of(name: str) -> int:
    stem = Path(name).stem
    return int(stem.rsplit("_part", 1)[1])


def finish_master(master: str | Path, status: str, reason: str = "", n_images: int | None = None) -> int:
    """Close the master: its ``n_written`` is the leading complete rows of the parts, ``status`` and
    ``end_reason`` say how the request ended (``n_images``: the request's length, if it changed: an
    open-ended request finished with what it has). Returns ``n_written``."""
    n_written = leading_rows(part_rows(master))
    with _open_for_update(master) as h5:
        h5.attrs.update({"status": status, "end_reason": reason, "n_written": np.uint64(n_written)})
        if n_images is not None:
            h5.attrs["n_images"] = np.uint64(n_images)
    return n_written


def is_master(h5: h5py.File) -> bool:
    """Whether ``h5`` is a master file (rather than an ordinary image file or a part)."""
    kind = h5.attrs.get("kind")
    return (kind.decode() if isinstance(kind, bytes) else kind) == MASTER_KIND


def master_accounting(master: str | Path) -> dict[str, int]:
    """The leading complete rows of a master and their statuses, like ``layout.file_accounting``:
    ``n_written`` (from the parts' counters, also while they are written or after a writer died),
    ``n_good``, ``n_incomplete`` and ``n_lost``."""
    n = leading_rows(part_rows(master))
    with h5py.File(master, "r", swmr=True) as h5:
        status = h5[layout.STATUS][:n]
    n_good = int(np.count_nonzero(status == 0))
    n_lost = int(np.count_nonzero(status == layout.STATUS_LOST))
    return {"n_written": n, "n_good": n_good, "n_lost": n_lost, "n_incomplete": n - n_good - n_lost}


def part_share(n_images: int, writer: int, n_writers: int) -> int:
    """How many of a request's ``n_images`` rows writer ``writer`` of ``n_writers`` holds."""
    return max(0, (n_images - writer + n_writers - 1) // n_writers)
