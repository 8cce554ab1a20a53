"""The device parts that need no DAQ: document composition, settings validation, policy, progress."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from event_model import DocumentNames, schema_validators

from std_daq_ophyd.acquisition import LostImagesError, LostImagesWarning, ProgressStatus, apply_policy
from std_daq_ophyd.control import Settings, SettingsError
from std_daq_ophyd.documents import Dataset, StreamDocuments, file_uri, uri_path
from std_daq_ophyd.writer import WriterProgress

IMAGE = Dataset("det_image", "/entry/data/data", (4, 6), "<u2", (1, 4, 6))
STATUS = Dataset("det_image_status", "/entry/data/status", (), "|u1", (4096,))


def _docs(docs: StreamDocuments, index: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    out = list(docs.collect(index))
    for name, doc in out:
        schema_validators[DocumentNames[name]].validate(doc)
    return out


def test_data_keys_have_frames_per_trigger_as_leading_dimension() -> None:
    docs = StreamDocuments([IMAGE, STATUS], rows_per_index=3, source="std-daq:test")
    assert docs.data_keys == {
        "det_image": {"source": "std-daq:test", "dtype": "array", "shape": [3, 4, 6], "dtype_numpy": "<u2",
                      "external": "STREAM:"},
        "det_image_status": {"source": "std-daq:test", "dtype": "array", "shape": [3], "dtype_numpy": "|u1",
                             "external": "STREAM:"},
    }


def test_resources_are_lazy_and_datums_cover_new_indices_once() -> None:
    docs = StreamDocuments([IMAGE, STATUS], rows_per_index=2, source="s")
    docs.open_file("/data/a.h5")
    assert _docs(docs) == []  # nothing written: the file is not referenced yet
    docs.add_indices(1)
    first = _docs(docs)
    assert [n for n, _ in first] == ["stream_resource", "stream_resource", "stream_datum", "stream_datum"]
    image_res, status_res = first[0][1], first[1][1]
    assert (image_res["mimetype"], image_res["uri"], image_res["data_key"]) == (
        "application/x-hdf5", "file://localhost/data/a.h5", "det_image")
    assert image_res["parameters"] == {"dataset": "/entry/data/data", "chunk_shape": [1, 4, 6]}
    assert status_res["parameters"] == {"dataset": "/entry/data/status", "chunk_shape": [4096]}
    datum = first[2][1]
    assert datum["indices"] == {"start": 0, "stop": 1}
    assert (datum["descriptor"], datum["seq_nums"]) == ("", {"start": 0, "stop": 0})  # the RE fills them in
    assert datum["stream_resource"] == image_res["uid"]
    assert _docs(docs) == []
    docs.add_indices(3)
    later = _docs(docs)
    assert [d["indices"] for _, d in later] == [{"start": 1, "stop": 4}] * 2
    assert docs.get_index() == 4


def test_collect_up_to_a_run_wide_index_and_across_files() -> None:
    docs = StreamDocuments([IMAGE], rows_per_index=1, source="s")
    docs.open_file("/data/a.h5")
    docs.add_indices(3)
    assert [d["indices"] for n, d in _docs(docs, index=2) if n == "stream_datum"] == [{"start": 0, "stop": 2}]
    docs.open_file("/data/b.h5")  # the owed index 2 of a.h5 is emitted before b.h5's
    docs.add_indices(2)
    out = _docs(docs, index=4)
    summary = [(n, d.get("uri"), d.get("indices")) for n, d in out]
    assert summary == [
        ("stream_datum", None, {"start": 2, "stop": 3}),
        ("stream_resource", "file://localhost/data/b.h5", None),
        ("stream_datum", None, {"start": 0, "stop": 1}),
    ]
    assert docs.get_index() == 5
    assert [d["indices"] for n, d in _docs(docs) if n == "stream_datum"] == [{"start": 1, "stop": 2}]


def test_uri_round_trip() -> None:
    assert uri_path(file_uri("/a b/c%d.h5")) == "/a b/c%d.h5"
    with pytest.raises(ValueError, match="not a file uri"):
        uri_path("http://x/y.h5")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("exptime", -0.1, "exptime must be a positive"),
    ("exptime", float("nan"), "exptime must be a positive"),
    ("period", -1.0, "period must be >= 0"),
    ("frames", 0, "frames must be an integer >= 1"),
    ("frames", 2.5, "frames must be an integer >= 1"),
    ("triggers", True, "triggers must be an integer >= 1"),
    ("timing", "SOMETIMES", "timing 'SOMETIMES' is not a timing mode"),
    ("bit_depth", 12, "bit_depth must be one of"),
])
def test_bad_settings_are_named(field: str, value: Any, message: str) -> None:
    good = {"exptime": 0.001, "period": 0.01, "frames": 1, "triggers": 1, "timing": "AUTO_TIMING"}
    with pytest.raises(SettingsError, match=message):
        Settings(**{**good, field: value}).validate()


def test_settings_request_uses_seed_names() -> None:
    settings = Settings(0.001, 0.01, 5, 2, "timingMode.TRIGGER_EXPOSURE", 16).validate()
    assert settings.as_request() == {"exptime": 0.001, "period": 0.01, "frames": 5, "triggers": 2,
                                     "timing": "TRIGGER_EXPOSURE", "dr": 16}
    with pytest.raises(SettingsError, match="shorter than exptime"):
        Settings(0.1, 0.01, 1, 1, "AUTO_TIMING").validate()


def test_policy() -> None:
    with pytest.raises(LostImagesError, match="2 of 5 images"):
        apply_policy("fail", 2, 5, "trigger 1")
    with pytest.warns(LostImagesWarning, match="1 of 5 images"):
        apply_policy("warn", 1, 5, "trigger 1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_policy("ignore", 3, 5, "trigger 1")
        apply_policy("fail", 0, 5, "trigger 1")


def test_progress_status_reports_to_watchers() -> None:
    class Dev:
        name = "det"

    seen: list[dict[str, Any]] = []
    status = ProgressStatus(Dev(), 4, call_stop_on_failure=False)
    status.watch(lambda **kw: seen.append(kw))
    status.update(1)
    status.update(4)
    status.set_finished()
    status.wait(10)
    assert seen[0]["current"] == 0 and seen[-1]["current"] == 4
    last = seen[-1]
    assert {k: last[k] for k in ("name", "initial", "target", "unit", "fraction")} == {
        "name": "det", "initial": 0, "target": 4, "unit": "images", "fraction": 0.0}
    assert seen[1]["fraction"] == 0.75 and seen[1]["time_elapsed"] >= 0


def test_writer_progress_from_request_status() -> None:
    progress = WriterProgress.from_status({
        "state": "running", "n_written": 7, "n_missing_images": 1, "n_incomplete_images": 2,
        "output_file": "/x.h5", "message": None, "services": {"writer_agent": "request_progress"}})
    assert (progress.n_bad, progress.started, progress.final) == (3, True, False)
    queued = WriterProgress.from_status({"state": "queued", "services": {}})
    assert (queued.n_written, queued.started) == (0, False)
