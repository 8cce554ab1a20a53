"""The HDF5 file of one acquisition, defined once (the seed's README left "H5 File format: TODO").

Layout (NeXus, readable while being written through SWMR)::

    /                                   file attributes:
        status        "writing" | "completed" | "interrupted" | "failed: <reason>"
        n_written     images in the file (final; while writing read /entry/data/n_written)
        n_images      images requested
        end_reason    why the file ended ("" while writing), e.g. "killed by request", "no image for 5 s"
        request_id, compression ("none" | "bitshuffle-lz4"), start_time, end_time (ISO 8601),
        creator, file_name, default = "entry"
    /entry                              NX_class = NXentry, default = "data"
        <request metadata>              one attribute per key: str/int/float/bool as such,
                                        anything else (lists, objects, null) as JSON text
    /entry/data                         NX_class = NXdata, signal = "data"
        data               (n, H, W)    image dtype (uint8/16/32 or float32), chunk (1, H, W) = one
                                        image per chunk whatever its size, optional bitshuffle-LZ4
                                        (filter 32008, decode with ``import hdf5plugin``)
        image_id           (n,)  uint64
        status             (n,)  uint8  0 good, 1 missing packets, 2 module id mismatch,
                                        3 lost: the ring slot was overwritten before the writer read it
                                        (pixels are zero); fill value 255 = row not written
        n_missing_packets  (n,)  uint32
        n_written          ()    uint64 live counter: rows [0, n_written) are complete and flushed
    /entry/instrument                   NX_class = NXinstrument
    /entry/instrument/detector          NX_class = NXdetector; attribute ``config`` = the detector
                                        JSON; each config field also as its own attribute
    NeXus/NXmx fields (pixel size, sensor, timing, pixel mask, modules, transformations; the NXmx
    definition when the request asks for it): see ``nexus.py``

The file is built under a hidden name (``.<name>.<random>.creating``, the name shortened to keep
it within 255 bytes) and appears under its own name only when every dataset and attribute exists and
SWMR mode is on, so a reader polling for it can open it at once. Both names are taken relative to one
descriptor of the folder (``dir_fd``: the h5 writer passes the one it opened inside its output root),
so the file is made in the folder that was checked. ``overwrite`` replaces only a file this DAQ wrote:
an HDF5 file whose ``creator`` attribute is :data:`CREATOR` (never a symlink, another kind of file or
another program's HDF5 file). Rows are appended as images arrive (datasets are extendable, ``maxshape``
None). The writer flushes per small batch (at most every 0.1 s by default, and whenever it is idle)
and only then raises ``n_written``, so a reader following the file (``h5py.File(path, "r",
swmr=True)``, ``dset.refresh()``) never counts an unwritten row.

A killed or timed-out acquisition closes the file with status ``interrupted`` (``end_reason`` says
why).

A full disk never leaves a file that cannot be opened: next to the file a reserve
(``.<name>.reserve``, :data:`RESERVE_BYTES`, allocated before the file is built) is kept while it is
written. When a write or flush fails with ENOSPC the reserve is released, so the library can still
write the metadata it holds; the file is closed with status ``failed: no space left on device`` and
holds every row flushed before the error. A disk too full for the reserve refuses the file at
creation, and nothing half made (no ``.creating`` file) is left behind.

A crashed writer leaves a valid file holding every flushed image and status ``writing``: it
opens with ``swmr=True`` (or :func:`open_image_file`), and :func:`recover_file` (run by the next h5
writer start) trims it to ``n_written``, sets status ``interrupted`` and makes it open like any
other file.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import json
import os
import stat
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for readers and writers)
import numpy as np

from daq_backend.config import DetectorConfig
from daq_backend.formats import ImageStatus
from daq_backend.writer import nexus
from daq_backend.writer.compression import BitshuffleLZ4, dataset_filter
from daq_backend.writer.roots import MAX_NAME_BYTES, fd_path

ENTRY = "/entry"
DATA_GROUP = "/entry/data"
DATA = "/entry/data/data"
IMAGE_ID = "/entry/data/image_id"
STATUS = "/entry/data/status"
N_MISSING_PACKETS = "/entry/data/n_missing_packets"
N_WRITTEN = "/entry/data/n_written"
INSTRUMENT = "/entry/instrument"
DETECTOR = "/entry/instrument/detector"

STATUS_LOST = int(ImageStatus.LOST)
#: fill value of the status dataset: a row that was never written
STATUS_NOT_WRITTEN = 255

FILE_WRITING = "writing"
FILE_COMPLETED = "completed"
FILE_INTERRUPTED = "interrupted"
COMPRESSIONS = ("none", "bitshuffle-lz4")
#: the ``creator`` file attribute of every file this DAQ writes (what ``overwrite`` recognises)
CREATOR = "std-daq-bluesky daq_backend.writer"
_META_CHUNK = 4096
#: bytes kept free next to a file being written, released when the disk fills up (room for the
#: metadata the HDF5 library still has to write when it closes the file)
RESERVE_BYTES = 1 << 20
#: the file status of a file ended by a full disk
FILE_NO_SPACE = "failed: no space left on device"


def is_no_space(exc: BaseException) -> bool:
    """True if ``exc`` is (or, as h5py words it, reports) ENOSPC."""
    return isinstance(exc, OSError) and (
        exc.errno == errno.ENOSPC or "No space left on device" in str(exc) or "errno = 28" in str(exc)
    )


def reserve_path(path: str | Path) -> Path:
    """The space reserve of the file ``path`` (see the module docstring): ``.<name>.reserve``, the
    name shortened to stay within 255 bytes."""
    path = Path(path)
    suffix = ".reserve"
    short = path.name.encode()[:MAX_NAME_BYTES - 1 - len(suffix)].decode("utf-8", "ignore")
    return path.with_name(f".{short}{suffix}")


def _make_reserve(path: Path, dir_fd: int | None = None) -> Path:
    """Allocate the space reserve of ``path`` (in the folder of ``dir_fd``, never through a symlink)."""
    reserve = reserve_path(path)
    try:
        fd = os.open(reserve.name if dir_fd is not None else reserve,
                     os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as exc:
        raise FileCreateError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError as exc:
        reserve.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise FileCreateError(f"cannot create {path}: no space left on device "
                                  f"({free_bytes(path.parent) >> 10} KiB free)") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise FileCreateError(f"cannot create {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return reserve


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``folder``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


class FileCreateError(OSError):
    """The output file could not be created; the message says which file and why."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="milliseconds")


def _attr_value(value: Any) -> Any:
    """An HDF5 attribute value for a JSON value: scalars as such, the rest as JSON text."""
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return np.int64(value)
    if isinstance(value, float | str):
        return value
    return json.dumps(value)


class ImageFile:
    """One acquisition file open for SWMR writing. Not thread-safe: one writer thread owns it."""

    def __init__(self, h5: h5py.File, path: Path, config: DetectorConfig, compression: str) -> None:
        self.h5 = h5
        self.path = path
        self.config = config
        self.compression = compression
        self._data = h5[DATA]
        self._frame_shape = tuple(self._data.shape[1:])
        self._ids = h5[IMAGE_ID]
        self._status = h5[STATUS]
        self._missing = h5[N_MISSING_PACKETS]
        self._counter = h5[N_WRITTEN]
        self._n = 0
        self._n_flushed = 0
        self._pending_ids: list[int] = []
        self._pending_status: list[int] = []
        self._pending_missing: list[int] = []
        dtype = np.dtype(config.image_dtype)
        self._codec = BitshuffleLZ4(config.image_nbytes, dtype.itemsize) if compression != "none" else None
        self._zero_chunk: np.ndarray | memoryview | bytes = self.encode(
            np.zeros(config.image_nbytes, dtype=np.uint8))
        if self._codec is not None:
            self._zero_chunk = bytes(self._zero_chunk)
        self.closed = False

    # -- creation ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        config: DetectorConfig,
        *,
        n_images: int,
        metadata: dict[str, Any] | None = None,
        compression: str = "none",
        overwrite: bool = False,
        request_id: str = "",
        dir_fd: int | None = None,
    ) -> ImageFile:
        """Create the file with every dataset and attribute, switch it to SWMR mode (after which
        no object or attribute may be added), and only then give it its name: a reader polling for
        the file never finds it half built or not yet open for SWMR reading. ``dir_fd``: a descriptor
        of the file's folder to create it in (default: the folder is opened by name). An existing
        file is replaced only with ``overwrite`` and only if this DAQ wrote it (:func:`replace_problem`);
        otherwise ``FileCreateError`` says why."""
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression: expected one of {COMPRESSIONS}, got {compression!r}")
        path = Path(path)
        own_fd = None
        if dir_fd is None:
            try:
                dir_fd = own_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise FileCreateError(f"cannot create {path}: {exc.strerror}") from None
        try:
            return cls._create(path, dir_fd, config, n_images, metadata or {}, compression, overwrite,
                               request_id)
        finally:
            if own_fd is not None:
                os.close(own_fd)

    @classmethod
    def _create(cls, path: Path, dir_fd: int, config: DetectorConfig, n_images: int, metadata: dict[str, Any],
                compression: str, overwrite: bool, request_id: str) -> ImageFile:
        problem = replace_problem(path.name, dir_fd, overwrite)
        if problem:
            raise FileCreateError(f"cannot create {path}: {problem}")
        building = _building_name(path.name)
        reserve = _make_reserve(path, dir_fd)
        try:
            h5 = h5py.File(fd_path(dir_fd, building), "w-", libver="latest")
        except (OSError, ValueError) as exc:
            with contextlib.suppress(FileNotFoundError):  # the library may have made it before failing
                os.unlink(building, dir_fd=dir_fd)
            reserve.unlink(missing_ok=True)
            why = "no space left on device" if is_no_space(exc) else str(exc)
            raise FileCreateError(f"cannot create {path}: {why}") from None
        try:
            cls._build(h5, config, path.name, n_images, metadata, compression, request_id)
            h5.swmr_mode = True
            publish_at(building, path, dir_fd, overwrite)
            return cls(h5, path, config, compression)
        except BaseException as exc:
            try:
                h5.close()
            except Exception:  # a full disk fails the close too; the file goes anyway
                pass
            with contextlib.suppress(FileNotFoundError):
                os.unlink(building, dir_fd=dir_fd)
            reserve.unlink(missing_ok=True)
            if is_no_space(exc):
                raise FileCreateError(f"cannot create {path}: no space left on device") from None
            raise

    @staticmethod
    def _build(
        h5: h5py.File,
        config: DetectorConfig,
        file_name: str,
        n_images: int,
        metadata: dict[str, Any],
        compression: str,
        request_id: str,
    ) -> None:
        h5.attrs.update({
            "default": "entry",
            "creator": CREATOR,
            "file_name": file_name,
            "status": FILE_WRITING,
            "n_written": np.uint64(0),
            "n_images": np.uint64(n_images),
            "request_id": request_id,
            "compression": compression,
            "start_time": _now(),
            "end_time": "",
            "end_reason": "",
        })
        entry = h5.create_group(ENTRY)
        entry.attrs.update({"NX_class": "NXentry", "default": "data"})
        for key, value in metadata.items():
            entry.attrs[key] = _attr_value(value)
        group = h5.create_group(DATA_GROUP)
        group.attrs.update({"NX_class": "NXdata", "signal": "data"})
        h, w = config.image_shape
        extra = dataset_filter() if compression == "bitshuffle-lz4" else {}
        data = group.create_dataset(
            "data", shape=(0, h, w), maxshape=(None, h, w), chunks=(1, h, w), dtype=config.image_dtype,
            **extra,
        )
        data.attrs["interpretation"] = "image"
        for name, dtype, fill in (("image_id", "<u8", 0), ("status", "u1", STATUS_NOT_WRITTEN),
                                  ("n_missing_packets", "<u4", 0)):
            group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(_META_CHUNK,), dtype=dtype,
                                 fillvalue=fill)
        group.create_dataset("n_written", shape=(), dtype="<u8", data=0)
        instrument = h5.create_group(INSTRUMENT)
        instrument.attrs["NX_class"] = "NXinstrument"
        detector = h5.create_group(DETECTOR)
        detector.attrs["NX_class"] = "NXdetector"
        config_dict = config.to_json_dict()
        detector.attrs["config"] = json.dumps(config_dict)
        for key, value in config_dict.items():
            if value is not None and key != "config":
                detector.attrs[key] = _attr_value(value)
        nexus.write_nexus(h5, config, n_images=n_images, metadata=metadata, start_time=h5.attrs["start_time"])

    # -- writing ----------------------------------------------------------------------------------
    @property
    def n_written(self) -> int:
        """Rows appended so far (flushed or not)."""
        return self._n

    @property
    def n_flushed(self) -> int:
        """Rows a reader can count on (the file's ``n_written`` counter)."""
        return self._n_flushed

    def encode(self, image: np.ndarray) -> np.ndarray | memoryview:
        """The chunk bytes for ``image`` (its raw bytes, or compressed into a buffer the next call reuses)."""
        if self._codec is None:
            return image
        return self._codec.compress(image)

    def append(self, image_id: int, status: int, n_missing_packets: int, chunk: Any | None) -> int:
        """Add one row: the chunk (from :meth:`encode`; None = lost image, zeros) and its metadata.
        Returns the row index. Visible to readers after the next :meth:`flush`."""
        index = self._n
        self._data.id.set_extent((index + 1, *self._frame_shape))  # Dataset.resize, without its checks
        if chunk is None:
            chunk, status = self._zero_chunk, STATUS_LOST
        try:
            self._data.id.write_direct_chunk((index, 0, 0), chunk)
        except BaseException:
            self._data.id.set_extent((index, *self._frame_shape))  # the row was not written
            raise
        self._pending_ids.append(image_id)
        self._pending_status.append(status)
        self._pending_missing.append(n_missing_packets)
        self._n = index + 1
        return index

    def mark_lost(self, index: int) -> None:
        """The chunk of a not yet flushed row turned out to be torn: replace it by zeros, status lost."""
        if not self._n_flushed <= index < self._n:
            raise IndexError(f"row {index} is not a pending row ({self._n_flushed}..{self._n - 1})")
        self._data.id.write_direct_chunk((index, 0, 0), self._zero_chunk)
        self._pending_status[index - self._n_flushed] = STATUS_LOST

    def flush(self) -> None:
        """Write pending metadata rows, flush the file, and only then raise the ``n_written`` counter."""
        if self._n == self._n_flushed:
            return
        a, b = self._n_flushed, self._n
        # h5py's low-level calls: at 100 Hz there is a flush per image, and the high-level
        # resize/__setitem__ (selection objects, shape checks) cost as much as the writes themselves
        memory = h5py.h5s.create_simple((b - a,))
        pending = ((self._ids, self._pending_ids), (self._status, self._pending_status),
                   (self._missing, self._pending_missing))
        for dset, values in pending:  # kept until all is written: a failed flush can be repeated
            dset.id.set_extent((b,))
            space = dset.id.get_space()
            space.select_hyperslab((a,), (b - a,))
            dset.id.write(memory, space, np.asarray(values, dtype=dset.dtype))
        for _, values in pending:
            values.clear()
        self.h5.flush()
        self._counter.id.write(h5py.h5s.create(h5py.h5s.SCALAR), h5py.h5s.create(h5py.h5s.SCALAR),
                               np.array(b, dtype="<u8"))
        self._counter.flush()
        self._n_flushed = b

    def release_reserve(self) -> None:
        """Free the space reserve (the disk is full: the library needs room to close the file)."""
        reserve_path(self.path).unlink(missing_ok=True)

    def close(self, status: str, reason: str = "") -> None:
        """Flush, record the final status and close. Safe to call twice. On a full disk the reserve
        is released and the flush repeated once, so the rows appended so far are kept."""
        if self.closed:
            return
        self.closed = True
        try:
            try:
                self.flush()
            except OSError as exc:
                if not is_no_space(exc):
                    raise
                self.release_reserve()
                self.flush()
            self.h5.attrs["status"] = status
            self.h5.attrs["n_written"] = np.uint64(self._n_flushed)
            self.h5.attrs["end_time"] = _now()
            self.h5.attrs["end_reason"] = reason
        finally:
            try:
                self.h5.close()
            finally:
                self.release_reserve()

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(FILE_COMPLETED if exc is None else f"failed: {exc}")


def _building_name(name: str) -> str:
    """The hidden name a file is built under: ``.<name>.<random>.creating``, within 255 bytes."""
    suffix = f".{uuid.uuid4().hex[:8]}.creating"
    room = MAX_NAME_BYTES - 1 - len(suffix)
    short = name.encode()[:room].decode("utf-8", "ignore")
    return f".{short}{suffix}"


def publish(building: Path, path: Path, overwrite: bool) -> None:
    """Give the finished file ``building`` (in the folder of ``path``) the name ``path``; with
    ``overwrite`` only an existing file this DAQ wrote is replaced (:func:`replace_problem`)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        problem = replace_problem(path.name, fd, overwrite) if overwrite else ""
        if problem:
            raise FileCreateError(f"cannot create {path}: {problem}")
        publish_at(building.name, path, fd, overwrite)
    finally:
        os.close(fd)


def publish_at(building: str, path: Path, dir_fd: int, overwrite: bool) -> None:
    """Give the finished file its name in the folder of ``dir_fd``; without ``overwrite`` never
    replace a file that appeared meanwhile (``link`` fails if the name exists, unlike ``rename``)."""
    name = path.name
    if overwrite:
        os.replace(building, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    try:
        os.link(building, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise FileCreateError(f"cannot create {path}: file exists") from None
    except OSError:  # a file system without hard links
        if os.path.lexists(fd_path(dir_fd, name)):
            raise FileCreateError(f"cannot create {path}: file exists") from None
        os.rename(building, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    os.unlink(building, dir_fd=dir_fd)


def replace_problem(name: str, dir_fd: int | None, overwrite: bool, creator: str = CREATOR) -> str:
    """Why ``name`` (in the folder of ``dir_fd``; None: the current folder) may not be created:
    "" when it does not exist, or exists, ``overwrite`` is set and it is a file this DAQ wrote
    (:func:`is_daq_file`; ``creator``: the attribute its writer sets); otherwise the reason, for the
    user."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    if not overwrite:
        return "file exists"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link; overwrite never replaces one"
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file; overwrite replaces only an HDF5 file this DAQ wrote"
    why = foreign_file_reason(name, dir_fd, creator)
    return f"overwrite replaces only an HDF5 file this DAQ wrote, and {why}" if why else ""


def foreign_file_reason(name: str, dir_fd: int | None = None, expected: str = CREATOR) -> str:
    """"" if ``name`` is an HDF5 file this DAQ wrote (its ``creator`` attribute is ``expected``), else
    why not. The file is opened with ``O_NOFOLLOW``, and only read."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    try:
        try:
            h5 = open_image_file(fd_path(fd))
        except OSError:
            return "it is not an HDF5 file"
        with h5:
            creator = h5.attrs.get("creator")
        if isinstance(creator, bytes):
            creator = creator.decode("utf-8", "replace")
        if creator != expected:
            return f"it is an HDF5 file of another program (creator {creator!r})"
        return ""
    finally:
        os.close(fd)


def is_daq_file(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file this DAQ wrote (not followed if it is a symlink)."""
    return not os.path.islink(path) and os.path.isfile(path) and not foreign_file_reason(str(path))


# -- reading and recovery -----------------------------------------------------------------------------


def open_image_file(path: str | Path) -> h5py.File:
    """Open a file of this layout for reading, also while it is written or after its writer crashed."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise
        return h5py.File(path, "r", swmr=True)


def written_rows(h5: h5py.File) -> int:
    """Rows a reader may use now (refreshes the counter when following a file being written)."""
    counter = h5[N_WRITTEN]
    if h5.swmr_mode:
        counter.refresh()
    return int(counter[()])


@cache
def _hdf5_library() -> ctypes.CDLL:
    """The libhdf5 instance h5py uses (property list ids are only valid inside it)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            name = os.path.basename(path)
            if name.startswith("libhdf5") and not name.startswith("libhdf5_hl") and ".so" in name:
                return ctypes.CDLL(path)
    raise RuntimeError("cannot locate the HDF5 library loaded by h5py")


def _clear_status_flags(path: Path) -> None:
    """What ``h5clear -s`` does: reset the superblock's "open for write" flags of a crashed writer."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    clear = ctypes.c_bool(True)
    if _hdf5_library().H5Pset(ctypes.c_int64(fapl.id), b"clear_status_flags", ctypes.byref(clear)) < 0:
        raise RuntimeError("this HDF5 library cannot clear file status flags")
    fid = h5py.h5f.open(str(path).encode(), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=fapl)
    fid.close()


def openable(path: str | Path) -> bool:
    """True if a plain reader can open the file (it was closed properly)."""
    try:
        h5py.File(path, "r").close()
    except OSError:
        return False
    return True


def file_accounting(h5: h5py.File) -> dict[str, int]:
    """The complete rows of a file and their statuses: ``n_written``, ``n_good``, ``n_incomplete``
    (missing packets, module id mismatch) and ``n_lost`` (zero rows)."""
    n = written_rows(h5)
    status = h5[STATUS][:n]
    n_good = int(np.count_nonzero(status == 0))
    n_lost = int(np.count_nonzero(status == STATUS_LOST))
    return {"n_written": n, "n_good": n_good, "n_lost": n_lost, "n_incomplete": n - n_good - n_lost}


def recover_file(path: str | Path, reason: str = "the writer stopped before closing the file",
                 status: str = FILE_INTERRUPTED) -> int:
    """Finish a file whose writer died (or could not close it): clear its open-for-write flags, trim
    every dataset to the flushed ``n_written`` rows, set ``status`` (default ``interrupted``) and
    ``end_reason``, remove the space reserve. Returns ``n_written``. A file that was closed properly
    is left as it is."""
    path = Path(path)
    reserve_path(path).unlink(missing_ok=True)
    try:
        h5py.File(path, "r").close()
        crashed = False
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise
        crashed = True
    if crashed:
        _clear_status_flags(path)
    with h5py.File(path, "r+") as h5:
        n = int(h5[N_WRITTEN][()])
        if h5.attrs.get("status") != FILE_WRITING:
            return int(h5.attrs.get("n_written", n))
        for name in (DATA, IMAGE_ID, STATUS, N_MISSING_PACKETS):
            if h5[name].shape[0] > n:
                h5[name].resize(n, axis=0)
        h5.attrs["status"] = status
        h5.attrs["n_written"] = np.uint64(n)
        h5.attrs["end_time"] = _now()
        h5.attrs["end_reason"] = reason
    return n
