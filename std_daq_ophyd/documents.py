"""The document part of the detector (ophyd-async's "data logic"): a count of completed indices in
an HDF5 file turned into ``StreamResource`` / ``StreamDatum`` documents.

One *index* is one trigger's worth of images (``frames_per_trigger`` rows of the file), so a data
key has shape ``[frames_per_trigger, *row_shape]`` and a step-scan event references exactly one
index, as the RunEngine requires. Every dataset of the file that belongs to the documents (the
images, their per-image status) gets its own data key and StreamResource; the resources of a file
are emitted lazily, with its first datum, so a file that never received an image is never
referenced. A run may span several files (a new file after a pause that cut a trigger short):
indices restart at 0 in each file, each file is its own StreamResource.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from event_model import ComposeStreamResource, ComposeStreamResourceBundle, StreamRange

HDF5_MIMETYPE = "application/x-hdf5"

AssetDoc = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Dataset:
    """One dataset of the file as a data key: ``row_shape`` is the shape of one row (one image: (H, W);
    one per-image value: ()), ``chunk_shape`` the dataset's HDF5 chunking."""

    data_key: str
    path: str
    row_shape: tuple[int, ...]
    dtype_numpy: str
    chunk_shape: tuple[int, ...]

    def data_key_doc(self, rows_per_index: int, source: str) -> dict[str, Any]:
        return {
            "source": source,
            "dtype": "array",
            "shape": [rows_per_index, *self.row_shape],
            "dtype_numpy": self.dtype_numpy,
            "external": "STREAM:",
        }


def file_uri(path: str | Path) -> str:
    """``file://localhost/abs/path`` (the form bluesky's consolidators and Tiled resolve)."""
    return "file://localhost" + str(Path(path).absolute())


def uri_path(uri: str) -> str:
    """The local path of a ``file://`` uri (what a reader opens)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.scheme != "file":
        raise ValueError(f"not a file uri: {uri!r}")
    return unquote(parts.path)


@dataclass
class _File:
    path: str
    bundles: dict[str, ComposeStreamResourceBundle] = field(default_factory=dict)
    completed: int = 0  # indices of this file whose rows are on disk
    emitted: int = 0  # indices already referenced by a stream datum


class StreamDocuments:
    """Composes the documents of one detector's run, file by file."""

    def __init__(self, datasets: list[Dataset], rows_per_index: int, source: str) -> None:
        if rows_per_index < 1:
            raise ValueError(f"rows_per_index must be >= 1, got {rows_per_index}")
        self.datasets = list(datasets)
        self.rows_per_index = rows_per_index
        self.source = source
        self._file: _File | None = None
        self._pending: deque[AssetDoc] = deque()
        self._total = 0  # indices completed in this run, all files

    @property
    def data_keys(self) -> dict[str, dict[str, Any]]:
        return {d.data_key: d.data_key_doc(self.rows_per_index, self.source) for d in self.datasets}

    @property
    def path(self) -> str | None:
        return None if self._file is None else self._file.path

    def open_file(self, path: str) -> None:
        """Later indices live in ``path``; what the previous file still owes is emitted first."""
        if self._file is not None:
            self._pending.extend(self._emit(self._file, self._file.completed))
        self._file = _File(path)

    def add_indices(self, n: int = 1) -> None:
        """``n`` more indices (``n * rows_per_index`` rows) of the current file are on disk."""
        if self._file is None:
            raise RuntimeError("no file is open")
        self._file.completed += n
        self._total += n

    @property
    def file_indices(self) -> int:
        """Indices completed in the current file (its rows: ``file_indices * rows_per_index``)."""
        return 0 if self._file is None else self._file.completed

    def get_index(self) -> int:
        """Indices completed in this run (what bluesky's ``get_index`` wants)."""
        return self._total

    def collect(self, index: int | None = None) -> Iterator[AssetDoc]:
        """Documents for the indices completed since the last call (up to run-wide ``index``)."""
        while self._pending:
            yield self._pending.popleft()
        file = self._file
        if file is None:
            return
        before = self._total - file.completed  # indices of the run in earlier files
        limit = file.completed if index is None else min(file.completed, index - before)
        yield from self._emit(file, limit)

    def _emit(self, file: _File, upto: int) -> list[AssetDoc]:
        if upto <= file.emitted:
            return []
        docs: list[AssetDoc] = []
        if not file.bundles:
            compose = ComposeStreamResource()
            for d in self.datasets:
                bundle = compose(
                    mimetype=HDF5_MIMETYPE,
                    uri=file_uri(file.path),
                    data_key=d.data_key,
                    parameters={"dataset": d.path, "chunk_shape": list(d.chunk_shape)},
                )
                file.bundles[d.data_key] = bundle
                docs.append(("stream_resource", dict(bundle.stream_resource_doc)))
        indices = StreamRange(start=file.emitted, stop=upto)
        for d in self.datasets:
            datum = file.bundles[d.data_key].compose_stream_datum(indices=indices)
            docs.append(("stream_datum", dict(datum)))
        file.emitted = upto
        return docs
