"""Reading detector data back through the documents, and a human summary of a std-daq file.

``stream_data(docs, key)`` follows exactly what a document consumer has: the descriptor's data key
(shape ``[rows_per_index, ...]``), the StreamResource (``uri`` + ``parameters.dataset``) and each
StreamDatum's ``indices`` and ``seq_nums`` — nothing std-daq specific — so it checks that the
documents alone locate the data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import h5py
import numpy as np

from std_daq_ophyd.documents import uri_path

Docs = Iterable[tuple[str, dict[str, Any]]]


def stream_data(docs: Docs, data_key: str, stream: str | None = None) -> np.ndarray:
    """The values of ``data_key`` for every event of ``stream`` (default: any), in ``seq_num`` order:
    an array of shape ``(n_events, *data_key_shape)``."""
    shapes: dict[str, list[int]] = {}  # descriptor uid -> shape of the key
    resources: dict[str, dict[str, Any]] = {}
    parts: list[tuple[int, np.ndarray]] = []
    for name, doc in docs:
        wanted = stream is None or doc.get("name") == stream
        if name == "descriptor" and data_key in doc["data_keys"] and wanted:
            shapes[doc["uid"]] = list(doc["data_keys"][data_key]["shape"])
        elif name == "stream_resource" and doc["data_key"] == data_key:
            resources[doc["uid"]] = doc
        elif name == "stream_datum" and doc["stream_resource"] in resources and doc["descriptor"] in shapes:
            resource = resources[doc["stream_resource"]]
            shape = shapes[doc["descriptor"]]
            rows = shape[0]
            start, stop = doc["indices"]["start"], doc["indices"]["stop"]
            with h5py.File(uri_path(resource["uri"]), "r", swmr=True) as h5:
                values = h5[resource["parameters"]["dataset"]][start * rows: stop * rows]
            values = values.reshape(stop - start, *shape)
            for k, seq_num in enumerate(range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])):
                parts.append((seq_num, values[k]))
    if not parts:
        raise LookupError(f"no stream datum references {data_key!r}")
    parts.sort(key=lambda p: p[0])
    return np.stack([p[1] for p in parts])


def file_summary(path: str) -> dict[str, Any]:
    """What a std-daq HDF5 file holds: shape, dtype, image ids, statuses, per-image mean, file status."""
    with h5py.File(path, "r", swmr=True) as h5:
        data = h5["/entry/data/data"]
        ids = h5["/entry/data/image_id"][:]
        status = h5["/entry/data/status"][:]
        means = np.array([float(np.mean(data[i])) for i in range(data.shape[0])])
        return {
            "path": path,
            "shape": tuple(data.shape),
            "dtype": str(data.dtype),
            "image_ids": ids,
            "status": status,
            "mean": means,
            "file_status": str(h5.attrs.get("status", "")),
            "n_written": int(h5.attrs.get("n_written", len(ids))),
        }


def format_summary(summary: dict[str, Any]) -> str:
    ids, status, means = summary["image_ids"], summary["status"], summary["mean"]
    counts = {int(s): int((status == s).sum()) for s in np.unique(status)}
    labels = {0: "good", 1: "missing packets", 2: "id mismatch", 3: "lost", 255: "not written"}
    lines = [
        f"file:      {summary['path']}",
        f"status:    {summary['file_status']} ({summary['n_written']} images)",
        f"data:      shape {summary['shape']}, dtype {summary['dtype']}",
        f"image ids: {ids[0]} .. {ids[-1]}" if len(ids) else "image ids: none",
        "per-image: " + ", ".join(f"{n} {labels.get(s, s)}" for s, n in counts.items()),
        "mean:      " + " ".join(f"{m:.1f}" for m in means[:12]) + (" ..." if len(means) > 12 else ""),
    ]
    return "\n".join(lines)
